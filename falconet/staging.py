"""Data staging: a task's input and output files, their wire formats, and client-side helpers.

A task may name *inputs* (files placed in its private working directory before it runs) and
*outputs* (files it writes there, delivered after it succeeds).  Sources and destinations:

- a local file of the client, uploaded once to the dispatcher's content-addressed blob store
  and fetched from there by executors on a cache miss (at most MAX_LOCAL_FILE_BYTES each);
- an ``s3://bucket/key`` URL, fetched or uploaded by the executor itself.

Spec (the task's staging field), msgpack; ``b""`` means no staging::

    {"in":  [[name, {"blob": "<sha256 hex>", "size": n} | {"s3": "s3://bucket/key"}], ...],
     "out": [[name, {"client": "/absolute/path"} | {"s3": "s3://bucket/key"}], ...]}

An output map may also hold ``"stream": "stdout" | "stderr"``: the executor writes that stream
of the command to the file ``name`` (not the command: it runs where it would without this
output, unless the task has other inputs or outputs), uncapped, and delivers it whether or
not the task succeeded.

Result files (what the executor delivered), msgpack; ``b""`` means none::

    {"out": [[name, {"blob": sha, "size": n, "client": path} | {"s3": url, "size": n}], ...]}

A client-bound entry may also carry ``"path"``: the file on the executor, used only inside
the executor before it uploads the file to the dispatcher.

``name`` is a relative path inside the work dir: no absolute path, no ``..``, ``.`` or
empty component.  Malformed input of either format raises :class:`StagingError`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from falconet.errors import FalconetError, InputNotFound, StagingError

CHUNK_BYTES = 1 << 20  #: bytes per upload/download chunk between peers and the dispatcher
MAX_LOCAL_FILE_BYTES = 256 << 20  #: per-file limit for files routed through the dispatcher
MAX_NAME_CHARS = 4096
STREAMS = ("stdout", "stderr")
#: work-dir names of the files a command's redirected streams are written to
STREAM_FILES = {"stdout": ".falconet-stdout", "stderr": ".falconet-stderr"}
_HASH_CACHE_MAX = 4096
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SPEC_KEYS = frozenset({"in", "out"})


def check_name(name: Any) -> str:
    """Return name if it is a safe relative path inside a work dir, else raise StagingError."""
    if type(name) is not str or not name or len(name) > MAX_NAME_CHARS or "\0" in name:
        raise StagingError(f"file name {name!r} must be a non-empty relative path")
    if name.startswith("/"):
        raise StagingError(f"file name {name!r} is absolute; name a path inside the task's work dir")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise StagingError(f"file name {name!r} has an empty, '.' or '..' component; use a plain relative path")
    return name


def check_digest(digest: Any) -> str:
    """Return digest if it is 64 lowercase hex characters (sha256), else raise StagingError."""
    if type(digest) is not str or not _DIGEST.fullmatch(digest):
        raise StagingError(f"blob digest {digest!r} is not a sha256 in lowercase hex")
    return digest


def parse_s3(url: Any) -> tuple[str, str]:
    """Split 's3://bucket/key' into (bucket, key), or raise StagingError."""
    if type(url) is not str or not url.startswith("s3://"):
        raise StagingError(f"{url!r} is not an s3:// URL; write s3://bucket/key")
    bucket, _, key = url[5:].partition("/")
    if not bucket or not key:
        raise StagingError(f"{url!r} lacks a bucket or key; write s3://bucket/key")
    return bucket, key


def _check_size(size: Any) -> int:
    if type(size) is not int or size < 0:
        raise StagingError(f"file size {size!r} must be a non-negative integer")
    return size


@dataclass(frozen=True, slots=True)
class Input:
    """A file placed at `name` before the task runs: a dispatcher blob or an S3 object."""

    name: str
    blob: str = ""
    size: int = 0
    s3: str = ""

    def __post_init__(self) -> None:
        check_name(self.name)
        if bool(self.blob) == bool(self.s3):
            raise StagingError(f"input {self.name!r} needs exactly one source: a blob or an s3:// URL")
        if self.blob:
            check_digest(self.blob)
            _check_size(self.size)
        else:
            parse_s3(self.s3)


@dataclass(frozen=True, slots=True)
class Output:
    """A file the task writes at `name`, delivered to a client path or an S3 object; with
    `stream` ("stdout" or "stderr"), that stream of the command, delivered even on failure."""

    name: str
    client: str = ""
    s3: str = ""
    stream: str = ""

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.stream and self.stream not in STREAMS:
            raise StagingError(f"output {self.name!r}: stream {self.stream!r} is not stdout or stderr")
        if bool(self.client) == bool(self.s3):
            raise StagingError(f"output {self.name!r} needs exactly one destination: a client path or s3:// URL")
        if self.s3:
            parse_s3(self.s3)
        elif type(self.client) is not str or not self.client.startswith("/"):
            raise StagingError(f"output {self.name!r}: client path {self.client!r} must be absolute")


@dataclass(frozen=True, slots=True)
class StageSpec:
    """All of a task's inputs and outputs; names are unique within each."""

    inputs: tuple[Input, ...] = ()
    outputs: tuple[Output, ...] = ()

    def __post_init__(self) -> None:
        for kind, items in (("input", self.inputs), ("output", self.outputs)):
            names = [f.name for f in items]
            if len(set(names)) != len(names):
                raise StagingError(f"two {kind}s share a name in {names!r}; give each its own")
        streams = [o.stream for o in self.outputs if o.stream]
        if len(set(streams)) != len(streams):
            raise StagingError(f"two outputs take the same stream in {streams!r}; give each stream one file")


def encode_spec(spec: StageSpec) -> bytes:
    """Encode a spec for the wire; an empty spec is b""."""
    if not spec.inputs and not spec.outputs:
        return b""
    ins = [[i.name, {"blob": i.blob, "size": i.size} if i.blob else {"s3": i.s3}] for i in spec.inputs]
    outs = [[o.name, _output_map(o)] for o in spec.outputs]
    return msgpack.packb({"in": ins, "out": outs}, use_bin_type=True)


def _output_map(o: Output) -> dict:
    dest = {"client": o.client} if o.client else {"s3": o.s3}
    return {**dest, "stream": o.stream} if o.stream else dest


def decode_spec(data: bytes) -> StageSpec:
    """Decode a spec from the wire, or raise StagingError naming what is malformed."""
    if not data:
        return StageSpec()
    raw = _unpack(data, "staging spec")
    if type(raw) is not dict or set(raw) != _SPEC_KEYS:
        raise StagingError('a staging spec is a map with exactly the keys "in" and "out"')
    ins = tuple(_decode_input(n, src) for n, src in _pairs(raw["in"], "in"))
    outs = tuple(_decode_output(n, dst) for n, dst in _pairs(raw["out"], "out"))
    return StageSpec(ins, outs)


def _unpack(data: bytes, what: str) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StagingError(f"a {what} is bytes, not {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same
        raise StagingError(f"{what} is not valid msgpack ({type(exc).__name__})") from None


def _pairs(items: Any, key: str) -> list[tuple[Any, dict]]:
    if type(items) is not list:
        raise StagingError(f'"{key}" must be a list of [name, map] pairs')
    for item in items:
        if type(item) is not list or len(item) != 2 or type(item[1]) is not dict:
            raise StagingError(f'each entry of "{key}" must be a [name, map] pair, not {item!r:.80}')
    return [(n, m) for n, m in items]


def _only(fields: dict, allowed: set, what: str) -> None:
    if not fields or not set(fields) <= allowed:
        raise StagingError(f"{what} must have keys among {sorted(allowed)}, got {sorted(map(str, fields))}")


def _decode_input(name: Any, src: dict) -> Input:
    _only(src, {"blob", "size", "s3"}, f"input {name!r:.80}")
    if ("s3" in src and len(src) != 1) or ("blob" in src and set(src) != {"blob", "size"}):
        raise StagingError(f'input {name!r:.80} must be {{"blob", "size"}} or {{"s3"}}')
    return Input(name, blob=src.get("blob", ""), size=src.get("size", 0), s3=src.get("s3", ""))


def _decode_output(name: Any, dst: dict) -> Output:
    _only(dst, {"client", "s3", "stream"}, f"output {name!r:.80}")
    dest = {k: v for k, v in dst.items() if k != "stream"}
    if len(dest) != 1 or not all(type(v) is str for v in dst.values()):
        raise StagingError(f'output {name!r:.80} must be {{"client": path}} or {{"s3": url}}, '
                           'with an optional "stream"')
    return Output(name, client=dst.get("client", ""), s3=dst.get("s3", ""), stream=dst.get("stream", ""))


def encode_result_files(files: Iterable[tuple[str, dict]]) -> bytes:
    """Encode (name, info) pairs of delivered outputs; none is b""."""
    items = [[name, dict(info)] for name, info in files]
    for name, info in items:
        _check_result(name, info)
    return msgpack.packb({"out": items}, use_bin_type=True) if items else b""


def decode_result_files(data: bytes) -> list[tuple[str, dict]]:
    """Decode result files into (name, info) pairs, or raise StagingError."""
    if not data:
        return []
    raw = _unpack(data, "result files")
    if type(raw) is not dict or set(raw) != {"out"}:
        raise StagingError('result files are a map with exactly the key "out"')
    pairs = _pairs(raw["out"], "out")
    for name, info in pairs:
        _check_result(name, info)
    return pairs


def _check_result(name: Any, info: dict) -> None:
    check_name(name)
    what = f"result file {name!r}"
    if "s3" in info:
        _only(info, {"s3", "size"}, what)
        parse_s3(info["s3"])
    else:
        _only(info, {"blob", "size", "client", "path"}, what)
        check_digest(info.get("blob"))
        client, path = info.get("client"), info.get("path", "/")
        if type(client) is not str or not client.startswith("/") or type(path) is not str or not path:
            raise StagingError(f"{what} needs an absolute client path (and a non-empty executor path if any)")
    _check_size(info.get("size"))


# ---- client side: user-facing normalisation ---------------------------------------------

_hashes: dict[tuple[str, int, int], str] = {}


def forget_hashes() -> None:
    """Hash every local input afresh: one was rewritten within its mtime's resolution."""
    _hashes.clear()


def file_sha256(path: str) -> str:
    """The sha256 hex digest of a file, read in CHUNK_BYTES pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def _local_blob(path: str) -> tuple[str, int, str]:
    """(sha256, size, realpath) of a local input, hashed once per (realpath, size, mtime)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise InputNotFound(f"input file {path!r} does not exist; create it or fix the path") from None
    if not os.path.isfile(real):
        raise StagingError(f"input {path!r} is not a regular file; name files, not directories")
    if st.st_size > MAX_LOCAL_FILE_BYTES:
        raise StagingError(f"input {path!r} is {st.st_size} bytes, over the {MAX_LOCAL_FILE_BYTES >> 20} MiB "
                           "limit for local files; put it in S3 and name its s3:// URL instead")
    key = (real, st.st_size, st.st_mtime_ns)
    digest = _hashes.get(key)
    if digest is None:
        if len(_hashes) >= _HASH_CACHE_MAX:
            _hashes.clear()
        digest = _hashes[key] = file_sha256(real)
    return digest, st.st_size, real


def _user_input(item: Any, cwd: str, blobs: dict[str, str]) -> Input:
    if isinstance(item, str):
        name = item.rsplit("/", 1)[-1] if item.startswith("s3://") else os.path.basename(item)
        if not name:
            raise StagingError(f"input {item!r} ends in '/'; name a file, or pass (name, source)")
        item = (name, item)
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not all(isinstance(x, str) for x in item):
        raise StagingError(f"input {item!r:.80} must be a path, an s3:// URL or a (name, source) pair")
    name, source = item
    if source.startswith("s3://"):
        return Input(name, s3=source)
    digest, size, real = _local_blob(os.path.join(cwd, source))
    blobs[digest] = real
    return Input(name, blob=digest, size=size)


def _user_output(item: Any, cwd: str) -> Output:
    if isinstance(item, str):
        item = (item, os.path.join(cwd, check_name(item)))
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not all(isinstance(x, str) for x in item):
        raise StagingError(f"output {item!r:.80} must be a name or a (name, destination) pair")
    name, dest = item
    if dest.startswith("s3://"):
        return Output(name, s3=dest)
    return Output(name, client=os.path.abspath(os.path.join(cwd, dest)))


def _user_stream(stream: str, dest: Any, cwd: str) -> Output:
    if not isinstance(dest, (str, os.PathLike)) or not str(dest):
        raise StagingError(f"{stream}={dest!r:.80} must be a file path or an s3:// URL")
    dest = os.fspath(dest)
    if dest.startswith("s3://"):
        return Output(STREAM_FILES[stream], s3=dest, stream=stream)
    return Output(STREAM_FILES[stream], client=os.path.abspath(os.path.join(cwd, dest)), stream=stream)


def spec_from_user(inputs: Iterable[Any] = (), outputs: Iterable[Any] = (), *,
                   streams: dict[str, Any] | None = None,
                   cwd: str | None = None) -> tuple[StageSpec, dict[str, str]]:
    """Normalise a user's inputs/outputs into a spec and {sha256: local path} of blobs to upload.

    inputs: "path", "s3://bucket/key" or (name, path-or-url); outputs: "name" (delivered to
    cwd/name), (name, "s3://bucket/key") or (name, client path); streams: {"stdout" or
    "stderr": client path or s3:// URL} for a command's streams sent to files.  Relative
    paths are taken from cwd (default: the current directory).
    """
    cwd = os.path.abspath(cwd or os.getcwd())
    blobs: dict[str, str] = {}
    ins = tuple(_user_input(item, cwd, blobs) for item in inputs)
    outs = tuple(_user_output(item, cwd) for item in outputs)
    streams = {k: v for k, v in (streams or {}).items() if v is not None}
    if set(streams) - set(STREAMS):
        raise StagingError(f"streams are stdout and stderr, not {sorted(set(streams) - set(STREAMS))}")
    outs += tuple(_user_stream(k, v, cwd) for k, v in streams.items())
    dests = [o.client or o.s3 for o in outs if o.stream]
    if len(dests) == 2 and dests[0] == dests[1]:
        raise StagingError(f"stdout and stderr both go to {dests[0]}; give each its own file, "
                           "or write 2>&1 in the command to merge them")
    return StageSpec(ins, outs), blobs


def chunks(path: str) -> Iterator[tuple[int, bytes]]:
    """(offset, data) pieces of a file for upload; an empty file yields one empty piece."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            data = f.read(CHUNK_BYTES)
            if data or offset == 0:
                yield offset, data
            if len(data) < CHUNK_BYTES:
                return
            offset += len(data)


# ---- receiving a blob -----------------------------------------------------------------------


class BlobWriter:
    """Receives a file's chunks in order into a temp file beside dest, verifies, renames into place.

    The temp file is named ``.<dest name>.<random>.part`` so owners of a directory can
    recognise and delete leftovers.  Any refusal removes the temp file and raises StagingError.
    """

    def __init__(self, dest: str, digest: str, total: int, *, fsync: bool = False,
                 on_done: Callable[[str, int], None] | None = None):
        self.dest, self.digest, self.total = dest, check_digest(digest), _check_size(total)
        self.written = 0
        self._fsync, self._on_done = fsync, on_done
        self._hash = hashlib.sha256()
        directory, base = os.path.split(dest)
        os.makedirs(directory or ".", exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=directory or ".", prefix=f".{base}.", suffix=".part")
        self._file = os.fdopen(fd, "wb")

    def write(self, offset: int, data: bytes) -> bool:
        """Append the chunk at offset; True once the whole file is verified and in place."""
        if self._file.closed:
            raise StagingError(f"{self.dest}: this upload is already finished or aborted; start again")
        if offset != self.written:
            self._refuse(f"chunk at offset {offset}, expected {self.written}; send chunks in order")
        if self.written + len(data) > self.total:
            self._refuse(f"{self.written + len(data)} bytes received, more than the declared {self.total}")
        try:
            self._file.write(data)
        except OSError as exc:
            self._refuse(f"cannot write: {exc.strerror}; free disk space or lower the cache size")
        self._hash.update(data)
        self.written += len(data)
        if self.written < self.total:
            return False
        self._finish()
        return True

    def abort(self) -> None:
        """Drop the partial file; safe to call more than once."""
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def _refuse(self, why: str) -> NoReturn:
        self.abort()
        raise StagingError(f"{self.dest}: {why}")

    def _finish(self) -> None:
        if self._hash.hexdigest() != self.digest:
            self._refuse(f"content has sha256 {self._hash.hexdigest()}, not {self.digest}; upload it again")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.dest)
        if self._fsync:
            fsync_dir(os.path.dirname(self.dest) or ".")
        if self._on_done is not None:
            self._on_done(self.digest, self.total)


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- fetching a blob from the dispatcher ---------------------------------------------------

FETCH_WINDOW = 8 * CHUNK_BYTES  #: bytes one GetBlob asks for; at most two windows are in flight
FETCH_STALL_S = 30.0  #: a fetch that heard nothing for this long is asked for again from 0


class Download:
    """One blob fetched from the dispatcher in windows, written in order by a BlobWriter.

    GetBlob(digest, offset) asks for one window; the next is asked for once the current
    one is under way, so a slow receiver never has more than two windows queued for it at
    the dispatcher.  Chunks out of sequence (left over from a request made before a
    reconnect or a restart) are ignored; a stalled fetch is started again.
    """

    def __init__(self, digest: str, make_writer: Callable[[int], BlobWriter]):
        self.digest = check_digest(digest)
        self.make_writer = make_writer
        self.writer: BlobWriter | None = None
        self.asked = 0  #: end of the last window asked for
        self.heard = 0.0  #: monotonic time of the last chunk (or of the start)

    def start(self, now: float) -> int:
        """Begin (or begin again) from 0; returns the offset to ask for."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self.asked, self.heard = FETCH_WINDOW, now
        return 0

    def stalled(self, now: float) -> bool:
        """True when nothing arrived for FETCH_STALL_S."""
        return now - self.heard > FETCH_STALL_S

    def feed(self, offset: int, total: int, data: bytes, now: float) -> tuple[bool, int | None]:
        """Write one chunk: (complete, offset of the next window to ask for, if any).

        Raises StagingError when the content is refused (size, hash) or cannot be written.
        """
        written = self.writer.written if self.writer is not None else 0
        if offset != written:
            return False, None  # stale: from a request abandoned since
        self.heard = now
        if self.writer is None:
            self.writer = self.make_writer(total)
        if self.writer.write(offset, data):
            return True, None
        if self.writer.written >= self.asked - FETCH_WINDOW and self.asked < total:
            ask, self.asked = self.asked, self.asked + FETCH_WINDOW
            return False, ask
        return False, None

    def abort(self) -> None:
        """Drop the partial file."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


Request = tuple[str, int]  #: (digest, offset): a GetBlob for the peer to send


class Downloads:
    """The blobs one peer (a client or an executor) is fetching from the dispatcher.

    The methods return the requests to send as GetBlob(digest, offset); the peer sends
    them, so this holds no socket.
    """

    def __init__(self) -> None:
        self.active: dict[str, Download] = {}

    def __contains__(self, digest: str) -> bool:
        return digest in self.active

    def __len__(self) -> int:
        return len(self.active)

    def begin(self, digest: str, make_writer: Callable[[int], BlobWriter], now: float) -> Request | None:
        """Start fetching digest into the writer make_writer(total) gives; None if under way."""
        if digest in self.active:
            return None
        fetch = self.active[digest] = Download(digest, make_writer)
        return digest, fetch.start(now)

    def again(self, now: float, only_stalled: bool) -> list[Request]:
        """Start again from 0 the fetches that stalled (or all, after a reconnect)."""
        return [(d, f.start(now)) for d, f in self.active.items() if not only_stalled or f.stalled(now)]

    def feed(self, digest: str, offset: int, total: int, data: bytes, error: str,
             now: float) -> tuple[bool, Request | None, str]:
        """One BlobData: (ended, the next request or None, why it failed or '').

        An ended fetch is forgotten: complete when the error is '', else its file dropped.
        A chunk of a fetch not under way (abandoned, or complete) is ignored.
        """
        fetch = self.active.get(digest)
        if fetch is None:
            return False, None, ""
        try:
            if error:
                raise StagingError(error)
            done, ask = fetch.feed(offset, total, data, now)
        except (FalconetError, OSError) as exc:
            fetch.abort()
            del self.active[digest]
            return True, None, str(exc)
        if done:
            del self.active[digest]
            return True, None, ""
        return False, None if ask is None else (digest, ask), ""

    def abort_all(self) -> list[str]:
        """Drop every partial file; returns the digests that were under way."""
        for fetch in self.active.values():
            fetch.abort()
        digests = list(self.active)
        self.active.clear()
        return digests
