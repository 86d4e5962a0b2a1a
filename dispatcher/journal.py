"""The dispatcher's append-only journal: what it accepted and what it finished, on disk.

File format (``STATE_DIR/journal``)::

    header:  MAGIC (16 bytes) | format version (u32, little-endian)
    record:  payload length (u32) | CRC-32 of the payload (u32) | payload

A payload is one msgpack array ``[kind, field, ...]`` of a :class:`Kind`.  Records are
buffered during a turn of the event loop and written with one ``write`` and one
``fdatasync`` (:meth:`Journal.commit`) before anything of that turn is sent, so a peer is
never told of something the journal could lose.  A crash mid-write leaves a torn tail: on
open, :meth:`Journal.replay` stops at the first record whose length or checksum does not
hold, logs it, and truncates the file there.

Compaction (:meth:`Journal.rewrite`) writes the live state as a new file beside the old
one, syncs it, and renames it into place, so a crash at any point leaves one whole journal.
It first checks that the disk has room for the whole current journal (the live state is
never larger), and removes its partial file if writing fails anyway; a ``journal.new``
left by a crash is removed at start.

A commit that fails (a full disk, a quota, an I/O error: :class:`JournalWriteError`) cuts
the file back to its last whole record and keeps the records for the next commit, so
nothing is lost and no torn record sits before later ones.
A ``lock`` file held with ``flock`` keeps a second dispatcher out of the same directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from falconet.dispatcher.records import Kind as Kind  # re-exported: records name their kind
from falconet.errors import JournalError, JournalWriteError

log = logging.getLogger("falconet.dispatcher")

MAGIC = b"falconet-journal"
FORMAT_VERSION = 2  # 2: tasks carry needs and files (protocol 3)
_HEADER = struct.Struct("<16sI")
_RECORD = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 31  # a larger length can only be garbage


def _full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Journal:
    """One state directory's journal, opened for replay and then for appending."""

    def __init__(self, state_dir: Path | str):
        self.dir = Path(state_dir)
        self.path = self.dir / "journal"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = self._lock()
            self.id = self._identity()  #: stays with the directory: clients tell one journal from another
            stale = self.dir / "journal.new"
            if stale.exists():  # a compaction that died before its rename: the journal is whole
                stale.unlink()
                log.warning("removed %s, left by a compaction that did not finish", stale)
        except OSError as exc:
            raise JournalError(f"cannot use state directory {self.dir}: {exc.strerror or exc}"
                               f"{' (the disk is full: free space there)' if _full(exc) else ''}") from None
        self._fd = -1
        self._buffer: list[bytes] = []
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self.size = 0  #: bytes in the file
        self.commits = 0  #: fsyncs since start
        self.recovered_from = ""  #: the log line of a torn tail recovered at open, if any

    def _lock(self) -> int:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JournalError(f"another dispatcher (pid {holder}) uses state directory {self.dir}; "
                               "stop it, or give this one its own --state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _identity(self) -> str:
        path = self.dir / "journal-id"
        if not path.exists():
            tmp = path.with_name("journal-id.new")
            tmp.write_text(uuid.uuid4().hex + "\n")
            os.replace(tmp, path)
        return path.read_text().strip()

    # ------------------------------------------------------------ reading

    def replay(self) -> Iterator[tuple[int, list]]:
        """Yield every whole record as (kind, fields), then open the file for appending."""
        try:
            yield from self._replay()
        except OSError as exc:
            raise JournalError(f"cannot read or open {self.path}: {exc.strerror or exc}") from None

    def _replay(self) -> Iterator[tuple[int, list]]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._open_new()
            return
        with open(self.path, "rb") as f:
            data = f.read()
        end = self._check_header(data)
        good = end
        while end < len(data):
            record = self._read_record(data, end)
            if record is None:
                self._refuse_if_more_follows(data, end)
                break
            payload_end, fields = record
            good = end = payload_end
            yield fields[0], fields[1:]
        if good < len(data):
            self.recovered_from = (
                f"journal {self.path}: the record at byte {good} is incomplete or corrupt (a crash "
                f"mid-write); recovered everything before it and dropped the last {len(data) - good} bytes")
            log.warning("%s", self.recovered_from)
            os.truncate(self.path, good)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = good

    def _check_header(self, data: bytes) -> int:
        if len(data) < _HEADER.size or not data.startswith(MAGIC):
            raise JournalError(f"{self.path} is not a falconet journal; move it away or give another "
                               "--state-dir")
        _, version = _HEADER.unpack_from(data)
        if version != FORMAT_VERSION:
            raise JournalError(
                f"{self.path} was written in journal format {version}; this falconet reads format "
                f"{FORMAT_VERSION}. Finish its tasks with the falconet that wrote it, or give a new --state-dir")
        return _HEADER.size

    def _refuse_if_more_follows(self, data: bytes, at: int) -> None:
        """A bad record followed by a whole one is damage, not a torn tail: keep the file."""
        if at + _RECORD.size > len(data):
            return
        length, _ = _RECORD.unpack_from(data, at)
        after = at + _RECORD.size + length
        if after < len(data) and self._read_record(data, after) is not None:
            raise JournalError(
                f"{self.path} is damaged at byte {at}, with whole records after it (not a crash "
                f"mid-write). Copy it away for inspection; to start from what precedes the damage, "
                f"run: truncate -s {at} {self.path}")

    @staticmethod
    def _read_record(data: bytes, at: int) -> tuple[int, list] | None:
        """The record at byte `at` as (its end, [kind, fields...]), or None if it is not whole."""
        if at + _RECORD.size > len(data):
            return None
        length, crc = _RECORD.unpack_from(data, at)
        start = at + _RECORD.size
        if length > MAX_RECORD_BYTES or start + length > len(data):
            return None
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            return None
        try:
            fields = msgpack.unpackb(payload, use_list=True)
        except Exception:  # a checksum collision on garbage: treat as the torn tail
            return None
        if type(fields) is not list or not fields or type(fields[0]) is not int:
            return None
        return start + length, fields

    # ------------------------------------------------------------ writing

    def append(self, kind: int, *fields: Any) -> None:
        """Buffer one record; it reaches the disk at the next commit()."""
        payload = self._pack([int(kind), *fields])
        if len(payload) > MAX_RECORD_BYTES:  # the core splits batches well below this
            raise JournalError(f"a journal record of {len(payload)} bytes is over the {MAX_RECORD_BYTES} limit")
        self._buffer.append(_RECORD.pack(len(payload), zlib.crc32(payload)))
        self._buffer.append(payload)

    def pending(self) -> bool:
        """True when records wait for commit()."""
        return bool(self._buffer)

    def commit(self) -> int:
        """Write the buffered records in one write and sync them; returns the bytes written.

        On a write or sync error the file is cut back to its last whole record, the records
        stay buffered for the next commit, and JournalWriteError says why and where."""
        if not self._buffer:
            return 0
        data = b"".join(self._buffer)
        self._buffer = [data]
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fdatasync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self.size)  # freeing space needs none; a dead disk may refuse
            except OSError:
                pass
            raise JournalWriteError(f"cannot write the journal {self.path}: {exc.strerror or exc}") from None
        self._buffer.clear()
        self.size += len(data)
        self.commits += 1
        return len(data)

    def pending_bytes(self) -> int:
        """Bytes waiting for commit()."""
        return sum(map(len, self._buffer))

    def room_to_compact(self) -> bool:
        """True when the disk has room for a compacted copy (never larger than the journal)."""
        try:
            return shutil.disk_usage(self.dir).free > self.size + (1 << 20)
        except OSError:
            return False

    def rewrite(self, records: Iterable[tuple[int, tuple]]) -> None:
        """Replace the journal by these records (the live state), atomically.  On an error
        the old journal stays as it was and the partial new file is removed."""
        self.commit()
        tmp = self.path.with_name("journal.new")
        try:
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(MAGIC, FORMAT_VERSION))
                for kind, fields in records:
                    payload = self._pack([int(kind), *fields])
                    f.write(_RECORD.pack(len(payload), zlib.crc32(payload)))
                    f.write(payload)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise JournalWriteError(f"cannot compact the journal into {tmp}: {exc.strerror or exc}") from None
        os.replace(tmp, self.path)
        self._sync_dir()
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = size

    def _open_new(self) -> None:
        with open(self.path, "wb") as f:
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION))
            f.flush()
            os.fsync(f.fileno())
        self._sync_dir()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = _HEADER.size

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Write what is buffered, then release the file and the directory lock."""
        try:
            if self._fd >= 0:
                self.commit()  # may raise JournalWriteError: the file and lock are let go all the same
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
