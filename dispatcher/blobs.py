"""The dispatcher's content-addressed blob store: input and output files routed through it.

Each blob is the file ``root/<sha256 hex>``.  Uploads arrive as chunks (offset, total,
data) from a peer and are written by a :class:`falconet.staging.BlobWriter` into a temp
file beside their final name, verified, and renamed into place, so a file named by a
digest always holds that content.  A restarted dispatcher indexes the blobs it finds and
deletes the temp files of uploads that were in flight.  No network code here: the event
loop calls these methods and answers peers with what they return or raise.

:class:`Holds` counts who still needs each blob; :class:`Streams` keeps the blobs being
sent to peers, in bounded windows.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from falconet.errors import StagingError
from falconet.staging import MAX_LOCAL_FILE_BYTES, BlobWriter, check_digest

log = logging.getLogger("falconet.dispatcher.blobs")


class BlobStore:
    """Files by sha256 under root, bounded by max_bytes in total (held plus being uploaded)."""

    def __init__(self, root: str, *, max_bytes: int, durable: bool,
                 max_blob_bytes: int = MAX_LOCAL_FILE_BYTES):
        self.root, self.max_bytes, self.durable = root, max_bytes, durable
        self.max_blob_bytes = max_blob_bytes
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._uploads: dict[tuple[bytes, str], BlobWriter] = {}
        self._reserved = 0  # declared totals of uploads in progress
        os.makedirs(root, exist_ok=True)
        self._index()

    def _index(self) -> None:
        """Learn the blobs already on disk; delete anything else (leftover temp files)."""
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False) and _is_digest(entry.name):
                self._sizes[entry.name] = entry.stat().st_size
                self._bytes += self._sizes[entry.name]
            elif entry.name.endswith(".part"):
                os.unlink(entry.path)
        if self._sizes:
            log.info("blob store %s: %d blobs, %d bytes", self.root, len(self._sizes), self._bytes)

    def put(self, peer: bytes, digest: str, offset: int, total: int, data: bytes) -> str | None:
        """Take one chunk: "" once the blob is complete and verified, None while in progress.

        Raises StagingError with the reason when refused; the partial upload is dropped then.
        A blob already held is acknowledged at once and its chunks discarded.
        """
        check_digest(digest)
        if digest in self._sizes:
            if total != self._sizes[digest]:
                raise StagingError(f"blob {digest} is held with {self._sizes[digest]} bytes, not {total}")
            self._end_upload(peer, digest)  # another peer finished the same content first
            return ""
        writer = self._writer(peer, digest, offset, total)
        try:
            done = writer.write(offset, data)
        except StagingError:
            self._end_upload(peer, digest)
            raise
        if not done:
            return None
        self._end_upload(peer, digest)
        self._sizes[digest] = total
        self._bytes += total
        return ""

    def _writer(self, peer: bytes, digest: str, offset: int, total: int) -> BlobWriter:
        """The upload this chunk belongs to; offset 0 starts (or restarts) one."""
        key = (peer, digest)
        if offset != 0:
            writer = self._uploads.get(key)
            if writer is None:
                raise StagingError(f"blob {digest}: no upload in progress for offset {offset}; start from 0")
            if writer.total != total:
                self._end_upload(peer, digest)
                raise StagingError(f"blob {digest}: total changed from {writer.total} to {total}")
            return writer
        self._end_upload(peer, digest)
        self._admit(digest, total)
        writer = BlobWriter(os.path.join(self.root, digest), digest, total, fsync=self.durable)
        self._uploads[key] = writer
        self._reserved += total
        return writer

    def _admit(self, digest: str, total: int) -> None:
        if total > self.max_blob_bytes:
            raise StagingError(f"blob {digest} is {total} bytes, over the per-file limit of "
                               f"{self.max_blob_bytes}; put large files in S3 and name their s3:// URLs")
        if self._bytes + self._reserved + total > self.max_bytes:
            raise StagingError(f"blob store full ({self._bytes + self._reserved} of {self.max_bytes} bytes "
                               f"used, {total} more asked); wait for results to be collected, "
                               "raise the store's limit, or use S3")

    def _end_upload(self, peer: bytes, digest: str) -> None:
        """Forget an upload; its temp file is removed unless it completed."""
        writer = self._uploads.pop((peer, digest), None)
        if writer is not None:
            writer.abort()
            self._reserved -= writer.total

    def has(self, digest: str) -> bool:
        """Whether the store holds this blob complete."""
        return digest in self._sizes

    def size(self, digest: str) -> int:
        """Size in bytes of a held blob; StagingError if not held."""
        try:
            return self._sizes[digest]
        except KeyError:
            raise StagingError(f"blob {digest!r} is not in the store; upload it first") from None

    def read(self, digest: str, offset: int, n: int) -> bytes:
        """Up to n bytes of a held blob from offset (b"" past its end)."""
        self.size(digest)
        with open(os.path.join(self.root, digest), "rb") as f:
            f.seek(offset)
            return f.read(n)

    def drop(self, digests: list[str] | tuple[str, ...] | set[str]) -> None:
        """Delete these blobs; unknown digests are ignored."""
        for digest in digests:
            size = self._sizes.pop(digest, None)
            if size is None:
                continue
            self._bytes -= size
            try:
                os.unlink(os.path.join(self.root, digest))
            except FileNotFoundError:
                log.warning("blob %s was already gone from %s", digest, self.root)

    def forget_peer(self, peer: bytes) -> None:
        """Abandon every partial upload of a peer that left or was lost."""
        for key in [k for k in self._uploads if k[0] == peer]:
            self._end_upload(*key)

    def status(self) -> dict:
        """Counts for the status reply: blobs, bytes, uploads in progress, max_bytes."""
        return {"blobs": len(self._sizes), "bytes": self._bytes, "uploads": len(self._uploads),
                "max_bytes": self.max_bytes}


def _is_digest(name: str) -> bool:
    try:
        check_digest(name)
    except StagingError:
        return False
    return True


class Holds:
    """Who still needs each blob, as counts per holder; a blob no one holds leaves the store.

    A client holds a blob once per input it uploaded and once per result that delivered it
    as an output, and releases each hold with one DropBlobs entry.  An executor's pin keeps
    an output it uploaded until the result naming it is in, when the pin becomes the
    client's hold.
    """

    def __init__(self, store: BlobStore):
        self.store = store
        self.counts: dict[str, collections.Counter[bytes]] = {}
        self.uploading: set[tuple[bytes, str]] = set()  #: (holder, blob) of uploads pinned, not ended

    def upload_chunk(self, holder: bytes, digest: str, last: bool) -> bool:
        """A chunk of holder's upload of a blob whose content is in the store (this upload's
        own copy, just completed, or one held already).  The upload holds the blob once,
        from its first such chunk: the content of a second upload is there from its start,
        and must not go (its first holder done with it) while the rest still comes, before
        the result that names it.  True when this chunk took the hold."""
        key = (holder, digest)
        if key in self.uploading:
            if last:
                self.uploading.discard(key)
            return False
        self.add(holder, [digest])
        if not last:
            self.uploading.add(key)
        return True

    def add(self, holder: bytes, digests: Iterable[str], delta: int = 1) -> None:
        """Change holder's count of each blob; delete the blobs no one holds any more."""
        for digest in digests:
            holders = self.counts.setdefault(digest, collections.Counter())
            holders[holder] += delta
            if holders[holder] <= 0:
                del holders[holder]
            if not holders:
                del self.counts[digest]
                self.store.drop([digest])

    def release(self, holder: bytes, digests: Iterable[str]) -> None:
        """One hold of each released; a blob the holder does not hold (held before a
        restart, or never) is kept: the store's limit bounds those."""
        for digest in digests:
            if holder in self.counts.get(digest, ()):
                self.add(holder, [digest], -1)

    def hand_over(self, pin: bytes, holder: bytes, digests: set[str]) -> None:
        """The holder now holds these blobs; the pin on them, if any, is lifted."""
        self.add(holder, digests)
        self.release(pin, digests)

    def drop_holder(self, holder: bytes) -> None:
        """Lift every hold of a holder that is gone."""
        self.uploading = {key for key in self.uploading if key[0] != holder}
        for digest in [d for d, h in self.counts.items() if holder in h]:
            self.add(holder, [digest], -self.counts[digest][holder])


class Streams:
    """Blobs being sent: one ordered stream per (destination, peer, blob), served round robin.

    A stream is ``[destination, peer, digest, offset, end, total]``; the destination is
    whatever the caller sends through (the server's socket).  GetBlob for the next window
    extends the stream, any other offset starts it again from there.
    """

    def __init__(self, store: BlobStore, window: int, chunk: int, per_peer: int):
        self.store, self.window, self.chunk, self.per_peer = store, window, chunk, per_peer
        self.items: list[list] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def ask(self, dest: Any, peer: bytes, digest: str, offset: int, total: int) -> bool:
        """Queue one window; True when it starts a new stream from offset 0 (a fetch)."""
        offset = min(max(0, offset), total)
        end = min(total, offset + self.window)
        for t in self.items:
            if t[0] is dest and t[1] == peer and t[2] == digest:
                if t[4] == offset:
                    t[4] = end  # the next window, in order after this one
                elif offset < t[3] or offset > t[4]:
                    t[3], t[4] = offset, end  # started again
                return False
        self.items.append([dest, peer, digest, offset, end, total])
        return offset == 0

    def forget(self, dest: Any, peers: set[bytes]) -> None:
        """Drop the streams to these peers (gone, or registering afresh)."""
        self.items = [t for t in self.items if t[0] is not dest or t[1] not in peers]

    def pump(self, budget: int, send: Callable[[Any, bytes, Any], bool], make: Callable[..., Any]) -> int:
        """Send up to budget bytes, one chunk per stream in turn, at most per_peer streams of
        one peer at once; send(dest, peer, make(digest, offset, total, data, error)) says
        whether the peer could be reached.  Returns the bytes sent."""
        sent_bytes = 0
        while budget > 0:
            moving: collections.Counter = collections.Counter()
            progressed = False
            for t in list(self.items):
                if budget <= 0:
                    break
                key = (id(t[0]), t[1])
                if moving[key] >= self.per_peer:
                    continue
                moving[key] += 1
                n = self._send_chunk(t, send, make)
                sent_bytes += n
                budget -= n + 1
                progressed = True
            if not progressed:
                break
        return sent_bytes

    def _send_chunk(self, t: list, send: Callable[[Any, bytes, Any], bool], make: Callable[..., Any]) -> int:
        """One chunk; a stream ends when its windows are sent or its peer is gone."""
        dest, peer, digest, offset, end, total = t
        try:
            data, error = self.store.read(digest, offset, min(self.chunk, end - offset)), ""
        except (StagingError, OSError) as exc:
            data, error = b"", f"could not be read: {exc}"
        sent = send(dest, peer, make(digest, offset, total, data, error))  # a peer gone asks again
        t[3] = offset + len(data)
        if not sent or error or t[3] >= t[4]:
            self.items.remove(t)
        return len(data) if sent else 0
