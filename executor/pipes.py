"""The pipes between an executor and its slots: length-prefixed msgpack frames and the
two record types they carry.

A frame to a slot is a list of :class:`SlotTask` (a chunk, run in order).  A frame from a
slot is ``[FromSlot, payload]``: RESULTS with a list of :class:`SlotResult`, or HANDED_BACK
with ``[tids, running_s]``: the tasks it was given and will not run, and how long the task
it runs has been running (0: none).  Both records are NamedTuples, so
msgpack sends them as arrays of their fields in this order, and each side rebuilds them
with ``_make``.

Reclaim: the executor sends the slot RECLAIM_SIGNAL when its running task is overdue with
tasks waiting behind it.  The slot answers each with exactly one HANDED_BACK frame, at once
if a task is running (from the signal handler), else before its next task or read: the
tasks of its chunk not started and the chunks still unread in its pipe (maybe none).  The
executor sends such a slot no new chunk until the answer came.
"""

from __future__ import annotations

import enum
import os
import signal
import struct
from typing import Any, NamedTuple

import msgpack

_HEADER = struct.Struct("<I")

#: a real-time signal, one that Python tasks and their libraries (faulthandler on SIGUSR1)
#: are unlikely to claim; SIGUSR2 where Python does not name real-time signals
RECLAIM_SIGNAL = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2


class FromSlot(enum.IntEnum):
    """What a frame from a slot carries."""

    RESULTS = 0  #: a list of SlotResult records, in the order the tasks ran
    HANDED_BACK = 1  #: [tids it will not run, seconds its task has run] (the answer to a reclaim)


class SlotTask(NamedTuple):
    """One task handed to a slot: the dispatcher's Assignment and what staging needs."""

    tid: int
    attempt: int
    kind: int
    body: bytes
    walltime_s: float
    cpus: int
    files: bytes  #: the staging spec, b"" for a task without files
    prefetched: list  #: blobs fetched from the dispatcher for this task (its cache misses)
    max_output: int  #: a larger output fails the task in the slot (the dispatcher's --max-output-bytes)


class SlotResult(NamedTuple):
    """One finished task, from a slot: the ExecResult's fields, then the slot's notes."""

    tid: int
    attempt: int
    state: int
    output: bytes
    reason: str
    started: float
    finished: float
    files: bytes  #: result files (protocol.ExecResult.files)
    cache: dict | None  #: a staged task's input-cache counts {"hits", "misses", "bytes_fetched"}
    uploads: bool  #: files name outbox paths, to send to the dispatcher before the result


#: how many of SlotResult's leading fields are protocol.ExecResult's
EXEC_RESULT_FIELDS = 8


def write_frame(fd: int, obj: Any) -> None:
    """Write one frame, blocking until all of it is in the pipe."""
    data = msgpack.packb(obj, use_bin_type=True)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, n: int) -> bytes | None:
    """Read exactly n bytes, or None at end of file."""
    parts = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_frame(fd: int) -> Any | None:
    """Read one frame, blocking; None at end of file."""
    header = read_exact(fd, _HEADER.size)
    if header is None:
        return None
    data = read_exact(fd, _HEADER.unpack(header)[0])
    return None if data is None else msgpack.unpackb(data)


class FrameReader:
    """Non-blocking side: feed whatever a read returned, take out complete frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buf = self._buf
        buf += data
        frames, pos, size = [], 0, len(buf)
        while size - pos >= 4:
            (n,) = _HEADER.unpack_from(buf, pos)
            if size - pos - 4 < n:
                break
            frames.append(msgpack.unpackb(bytes(buf[pos + 4:pos + 4 + n])))
            pos += 4 + n
        del buf[:pos]
        return frames
