"""The dispatcher's content-addressed blob store: input and output files routed through it.

Each blob is the file ``root/<sha256 hex>``.  Uploads arrive as chunks (offset, total,
data) from a peer and are written by a :class:`falconet.staging.BlobWriter` into a temp
file beside their final name, verified, and renamed into place, so a file named by a
digest always holds that content.  A restarted dispatcher indexes the blobs it finds and
deletes the temp files of uploads that were in flight.  No network code here: the event
loop calls these methods and answers peers with what they return or raise.
"""

from __future__ import annotations

import logging
import os

from falconet.staging import MAX_LOCAL_FILE_BYTES, BlobWriter, StagingError, check_digest

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
