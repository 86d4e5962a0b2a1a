"""Staging on the executor: the input cache, S3 transfers, and a task run in a staged work dir.

The executor's main loop fetches dispatcher blobs into the :class:`InputCache` (by sha256)
before it hands a task to a slot; the slot calls :func:`run_staged`, which places inputs
(hard links into the cache when possible), fetches S3 inputs through the cache, runs the
task in a private work dir, and delivers its outputs: S3 outputs are uploaded here, client
outputs are moved into the outbox for the main loop to upload to the dispatcher.

Several slot processes share one cache directory: entries appear by atomic rename, any
process may evict, and counters are per process (each task reports its own hits/misses).
Cache files are made read-only because a hard-linked input shares the cached inode; a task
that rewrites an input in place as root would still change the cached copy.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from typing import Any

from falconet.protocol import TaskState
from falconet.staging import (
    MAX_LOCAL_FILE_BYTES,
    BlobWriter,
    Output,
    StageSpec,
    StagingError,
    decode_spec,
    encode_result_files,
    file_sha256,
    parse_s3,
)

DONE, FAILED = int(TaskState.DONE), int(TaskState.FAILED)
MULTIPART_BYTES = 8 << 20  #: S3 transfers above this size are multipart, in parts of this size
STALE_TEMP_S = 3600.0  #: a partial cache file untouched this long is a dead process's leftover
_KEY = re.compile(r"(s3-)?[0-9a-f]{64}")

Run = Callable[[str | None, dict[str, str]], tuple[int, bytes, str]]  # (cwd, {stream: file}) -> outcome


class InputCache:
    """Input files by content key under root, evicted least recently used down to max_bytes."""

    def __init__(self, root: str, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.hits = self.misses = self.bytes_fetched = 0
        os.makedirs(root, exist_ok=True)
        self._clean_temp()

    def _clean_temp(self) -> None:
        cutoff = time.time() - STALE_TEMP_S
        for entry in os.scandir(self.root):
            if entry.name.endswith(".part") and entry.stat().st_mtime < cutoff:
                _unlink(entry.path)

    def path(self, key: str) -> str:
        """Where the entry of this key lives (it may not exist)."""
        if type(key) is not str or not _KEY.fullmatch(key):
            raise StagingError(f"cache key {key!r} is neither a sha256 nor 's3-' and a sha256")
        return os.path.join(self.root, key)

    def has(self, key: str) -> bool:
        """Whether the entry is present (not counted as a hit or miss)."""
        return os.path.isfile(self.path(key))

    def writer(self, key: str, total: int) -> BlobWriter:
        """A writer for a blob streamed from the dispatcher; key is its sha256."""
        return BlobWriter(self.path(key), key, total, on_done=lambda k, _n: self._inserted(k))

    def add_file(self, key: str, src_path: str) -> None:
        """Move src_path into the cache as key (copied when on another file system)."""
        dest = self.path(key)
        try:
            os.replace(src_path, dest)
        except OSError:  # another file system: copy beside dest, then rename atomically
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".part")
            os.close(fd)
            shutil.copyfile(src_path, tmp)
            os.replace(tmp, dest)
            _unlink(src_path)
        self._inserted(key)

    def temp_path(self) -> str:
        """A new empty temp file in the cache directory, for a download to add_file later."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".dl.", suffix=".part")
        os.close(fd)
        return tmp

    def place(self, key: str, dest: str) -> bool:
        """Hard-link (else copy) the entry to dest and mark it used; False if it is absent."""
        src = self.path(key)
        try:
            link_or_copy(src, dest)
        except FileNotFoundError:
            if os.path.exists(src):
                raise  # dest's directory is missing, not the entry
            return False
        try:
            os.utime(src)
        except FileNotFoundError:
            pass  # evicted by another process since; dest already has its content
        return True

    def record(self, hit: bool, nbytes: int = 0) -> None:
        """Count one lookup: a hit, or a miss that fetched nbytes."""
        if hit:
            self.hits += 1
        else:
            self.misses += 1
            self.bytes_fetched += nbytes

    def _inserted(self, key: str) -> None:
        os.chmod(self.path(key), 0o444)
        self.evict(keep=key)

    def _entries(self) -> list[tuple[float, int, str]]:
        """(atime, size, key) of every entry; ones vanishing meanwhile are skipped."""
        found = []
        for entry in os.scandir(self.root):
            if _KEY.fullmatch(entry.name):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                found.append((st.st_atime, st.st_size, entry.name))
        return found

    def evict(self, keep: str = "") -> int:
        """Delete least recently used entries (never keep) until within max_bytes; how many."""
        entries = sorted(self._entries())
        excess = sum(size for _, size, _ in entries) - self.max_bytes
        removed = 0
        for _, size, key in entries:
            if excess <= 0:
                break
            if key != keep:
                _unlink(os.path.join(self.root, key))
                excess -= size
                removed += 1
        return removed

    def stats(self) -> dict:
        """This process's counters and the cache's current entries and bytes."""
        entries = self._entries()
        return {"hits": self.hits, "misses": self.misses, "bytes_fetched": self.bytes_fetched,
                "entries": len(entries), "bytes": sum(size for _, size, _ in entries),
                "max_bytes": self.max_bytes}


def link_or_copy(src: str, dest: str) -> None:
    """Hard-link src at dest, or copy it when a link is impossible (other file system, limits)."""
    try:
        os.link(src, dest)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(src, dest)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---- S3 ---------------------------------------------------------------------------------------

_default_client: Any = None


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client; the endpoint defaults to $FALCONET_S3_ENDPOINT_URL or $AWS_ENDPOINT_URL_S3."""
    import boto3
    from botocore.config import Config

    endpoint = (endpoint_url or os.environ.get("FALCONET_S3_ENDPOINT_URL")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or None)
    options: dict[str, Any] = {"retries": {"max_attempts": 5, "mode": "standard"}}
    if endpoint:  # self-hosted endpoints (moto, MinIO) rarely serve bucket subdomains
        options["s3"] = {"addressing_style": "path"}
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(**options))


def default_s3() -> Any:
    """This process's S3 client, made on first use (slots reuse it across tasks)."""
    global _default_client
    if _default_client is None:
        _default_client = s3_client()
    return _default_client


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    # use_threads=False: parts go one after another in this process, which stays single-threaded
    return TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                          use_threads=False)


_ADVICE = {
    "NoSuchKey": "no such object; check the key, or upload the object first",
    "NoSuchBucket": "no such bucket; check the bucket name and region",
    "AccessDenied": "access denied; grant the executor's role or keys access to this object",
    "PreconditionFailed": "the object changed while it was fetched; run the task again",
}
_CODES = {"404": "NoSuchKey", "403": "AccessDenied", "412": "PreconditionFailed"}


def s3_error(url: str, exc: Exception) -> StagingError:
    """One line for a failed S3 call: the URL first, then what is wrong and what to do."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StagingError(f"{url}: no AWS credentials; give the executor an instance role "
                            "or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, EndpointConnectionError):
        return StagingError(f"{url}: cannot reach S3 ({exc}); check the network or FALCONET_S3_ENDPOINT_URL")
    code = ""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
    elif isinstance(exc, S3UploadFailedError):
        found = re.search(r"\((\w+)\)", str(exc))
        code = found.group(1) if found else ""
    code = _CODES.get(code, code)
    if code in _ADVICE:
        return StagingError(f"{url}: {code}: {_ADVICE[code]}")
    return StagingError(f"{url}: {code or type(exc).__name__}: {exc}")


def _missing_code(client: Any, bucket: str) -> str:
    """After a bare 404 on HEAD: is it the bucket or the key that is missing?"""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError):
        return "NoSuchBucket"
    return "NoSuchKey"


def fetch_s3(client: Any, url: str, dest: str, cache: InputCache) -> bool:
    """Place the S3 object at dest through the cache; True on a cache hit.

    The cache key covers the URL and the object's ETag, so a changed object is fetched again.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3(url)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) == "404":
            code = _missing_code(client, bucket)
            raise StagingError(f"{url}: {code}: {_ADVICE[code]}") from None
        raise s3_error(url, exc) from None
    except BotoCoreError as exc:
        raise s3_error(url, exc) from None
    etag = head["ETag"]
    ckey = "s3-" + hashlib.sha256(f"{url}\n{etag}".encode()).hexdigest()
    if cache.place(ckey, dest):
        cache.record(True)
        return True
    _download(client, url, etag, head["ContentLength"], dest, cache, ckey)
    cache.record(False, head["ContentLength"])
    return False


def _download(client: Any, url: str, etag: str, size: int, dest: str, cache: InputCache, ckey: str) -> None:
    """Download into a cache temp file, link it to dest, then add it to the cache."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3(url)
    tmp = cache.temp_path()
    try:
        client.download_file(bucket, key, tmp, Config=_transfer_config())
        # download_file takes no IfMatch; a second look tells whether we got what we keyed
        if os.path.getsize(tmp) != size or client.head_object(Bucket=bucket, Key=key)["ETag"] != etag:
            raise StagingError(f"{url}: PreconditionFailed: {_ADVICE['PreconditionFailed']}")
        link_or_copy(tmp, dest)
        cache.add_file(ckey, tmp)
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise s3_error(url, exc) from None
    finally:
        _unlink(tmp)


def upload_s3(client: Any, path: str, url: str) -> int:
    """Upload a file to url (multipart above MULTIPART_BYTES); returns its size."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3(url)
    size = os.path.getsize(path)
    try:
        client.upload_file(path, bucket, key, Config=_transfer_config())
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise s3_error(url, exc) from None
    return size


# ---- a staged run --------------------------------------------------------------------------


def run_staged(spec_bytes: bytes, *, work_root: str, cache: InputCache, outbox: str, run: Run,
               s3: Any = None, prefetched: Collection[str] = ()) -> tuple[int, bytes, str, bytes, dict]:
    """Place inputs in a private work dir, run(cwd, streams), deliver outputs, remove the work dir.

    Returns (state, output, reason, result_files, counts), counts being this task's cache
    {"hits", "misses", "bytes_fetched"}.  Blob inputs must already be in the cache; those in
    `prefetched` (fetched for this task by the caller) count as misses.  s3: a boto3 client
    (default: one per process from the environment, made only when needed).  Outputs are
    delivered only when the run is DONE and every output exists; stream outputs (the
    command's stdout or stderr, written to files in the work dir) are delivered either way.
    The task runs in the work dir when it has inputs or outputs of its own; with stream
    outputs only, cwd is None and it runs where an unstaged task would.
    """
    before = (cache.hits, cache.misses, cache.bytes_fetched)
    try:
        spec = decode_spec(spec_bytes)
    except StagingError as exc:
        return FAILED, b"", f"staging spec: {exc}", b"", _counts(cache, before)
    workdir = tempfile.mkdtemp(dir=work_root, prefix="task-")
    try:
        reason = _place_inputs(spec, workdir, cache, s3, prefetched)
        if reason:
            return FAILED, b"", reason, b"", _counts(cache, before)
        streams = {o.stream: os.path.join(workdir, o.name) for o in spec.outputs if o.stream}
        own_files = spec.inputs or len(streams) < len(spec.outputs)
        state, output, reason = run(workdir if own_files else None, streams)
        files, why = _deliver_outputs(spec, workdir, outbox, s3, failed=state != DONE)
        if why:
            reason = why if state == DONE else f"{reason}; {why}"
            state = FAILED
        return state, output, reason, files, _counts(cache, before)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _counts(cache: InputCache, before: tuple[int, int, int]) -> dict:
    hits, misses, fetched = before
    return {"hits": cache.hits - hits, "misses": cache.misses - misses,
            "bytes_fetched": cache.bytes_fetched - fetched}


def _in_workdir(workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _place_inputs(spec: StageSpec, workdir: str, cache: InputCache, s3: Any,
                  prefetched: Collection[str]) -> str:
    """Put every input in the work dir; the reason the task cannot run, or ""."""
    for inp in spec.inputs:
        try:
            dest = _in_workdir(workdir, inp.name)
            if inp.s3:
                fetch_s3(s3 or default_s3(), inp.s3, dest, cache)
            elif cache.place(inp.blob, dest):
                fetched = inp.blob in prefetched
                cache.record(not fetched, inp.size if fetched else 0)
            else:
                cache.record(False)
                return (f"input {inp.name!r} (blob {inp.blob[:12]}) is not in the executor's cache; "
                        "the executor must fetch it from the dispatcher first")
        except StagingError as exc:
            return f"input {inp.name!r} from {exc}"
        except OSError as exc:
            return f"input {inp.name!r}: cannot place it in the work dir: {exc}"
    return ""


def _check_outputs(outputs: list[Output], workdir: str) -> str:
    """Why the outputs cannot be delivered (missing, too big for the dispatcher), or ""."""
    missing = [o.name for o in outputs if not os.path.isfile(os.path.join(workdir, o.name))]
    if len(missing) == 1:
        return f"output {missing[0]!r} was not produced"
    if missing:
        return f"outputs {', '.join(map(repr, missing))} were not produced"
    for o in outputs:
        size = os.path.getsize(os.path.join(workdir, o.name))
        if o.client and size > MAX_LOCAL_FILE_BYTES:
            return (f"{_label(o)} is {size} bytes, over the {MAX_LOCAL_FILE_BYTES >> 20} MiB limit for files "
                    f"delivered through the dispatcher; send it to an s3:// URL instead")
    return ""


def _deliver_outputs(spec: StageSpec, workdir: str, outbox: str, s3: Any,
                     failed: bool = False) -> tuple[bytes, str]:
    """Upload S3 outputs and move client ones to the outbox: (result files, failure reason).

    failed: the task failed; only its stream outputs that exist are delivered.
    """
    outputs = list(spec.outputs)
    if failed:
        outputs = [o for o in outputs if o.stream and os.path.isfile(os.path.join(workdir, o.name))]
    why = _check_outputs(outputs, workdir)
    if why or not outputs:
        return b"", why
    os.makedirs(outbox, exist_ok=True)
    box = tempfile.mkdtemp(dir=outbox, prefix="out-")
    try:
        files = [(o.name, _deliver(o, workdir, box, s3)) for o in outputs]
    except StagingError as exc:
        shutil.rmtree(box, ignore_errors=True)
        return b"", str(exc)
    if not any(o.client for o in outputs):
        os.rmdir(box)
    return encode_result_files(files), ""


def _label(out: Output) -> str:
    """How a reason names an output: 'output NAME', or 'its stdout' for a stream."""
    return f"its {out.stream}" if out.stream else f"output {out.name!r}"


def _deliver(out: Output, workdir: str, box: str, s3: Any) -> dict:
    """Deliver one output; its result-file info.  StagingError says which output failed."""
    src = os.path.join(workdir, out.name)
    if out.s3:
        try:
            return {"s3": out.s3, "size": upload_s3(s3 or default_s3(), src, out.s3)}
        except StagingError as exc:
            raise StagingError(f"{_label(out)} to {exc}") from None
    try:
        dest = _in_workdir(box, out.name)
        shutil.move(src, dest)
        return {"blob": file_sha256(dest), "size": os.path.getsize(dest), "client": out.client, "path": dest}
    except OSError as exc:
        raise StagingError(f"{_label(out)}: cannot move it to the outbox: {exc}") from None
