"""Task, executor and fleet events: recorded cheaply on the loop, kept in bounded memory.

The loop records *raw* events, one per batch (a Submit, a Report's started tasks, a
client's results of one turn) holding references to objects it made anyway; the
observer thread (:mod:`.observe`) expands them into one event per task and keeps them
in a :class:`History`, a ring bounded by a number of events, optionally mirrored to disk
(segments under the state directory, also bounded) so that ``falconet events --since T``
still reads them after a restart.  A slow or absent reader loses old events, never the
dispatcher's memory.

An event is a tuple ``(number, kind, at, ...)`` whose remaining fields are named by
:data:`FIELDS`; :func:`as_map` turns one into the JSON-friendly map clients print.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import operator
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from falconet import tasks as tk
from falconet.protocol import TaskState
from falconet.reports import Fleet

log = logging.getLogger("falconet.dispatcher")

# Raw records, as the loop appends them to Core.events.
SUBMITTED, STARTED, FINISHED, EXECUTOR, FLEET = range(5)

MAX_PER_REQUEST = 5000  #: events in one EventsRequest answer
REASON_CHARS = 300  #: a failure's reason, cut to this in its event

#: the fields after (number, kind, at) of each kind of event
FIELDS = {
    "submitted": ("client", "task"),
    "started": ("client", "task", "executor", "attempt"),
    "finished": ("client", "task", "executor", "attempt", "outcome", "wait_s", "run_s", "reason"),
    "joined": ("executor", "host", "detail"),
    "drained": ("executor", "host", "detail"),
    "released": ("executor", "host", "detail"),
    "left": ("executor", "host", "detail"),
    "lost": ("executor", "host", "detail"),
    "launched": ("node", "type", "detail"),
    "terminated": ("node", "type", "detail"),
}
_OUTCOMES = {int(s): s.name.lower() for s in TaskState}


def as_map(event: tuple | list) -> dict:
    """One event as a map: {"n", "event", "at", and the fields of its kind}."""
    n, kind, at, *rest = event
    return {"n": n, "event": kind, "at": at, **dict(zip(FIELDS.get(kind, ()), rest))}


def fleet_changes(old: Fleet | None, new: Fleet, wall: float) -> list[tuple]:
    """Raw FLEET records for the nodes a fleet report added or dropped since the last one."""
    before = {n.id: n for n in old.nodes} if old is not None else {}
    after = {n.id: n for n in new.nodes}
    out = [(FLEET, wall, "launched", n.id, n.type, f"{new.backend}, {n.state}")
           for i, n in after.items() if i not in before]
    out += [(FLEET, wall, "terminated", n.id, n.type, new.backend) for i, n in before.items() if i not in after]
    return out


def compact(raw: tuple) -> tuple:
    """A raw record without what the history need not keep (task bodies, outputs), cheaply:
    the per-task work is C-level (a transpose, an itemgetter), as this runs for every task."""
    code = raw[0]
    if code == FINISHED:  # columns: seq, state, reason, executor, attempts, submitted, started, finished
        cols = tuple(zip(*raw[3]))
        return (FINISHED, raw[1], raw[2], (cols[0], cols[1], *cols[3:9])) if cols else (FINISHED, raw[1], raw[2], ())
    if code == SUBMITTED:  # raw[3]: the batch's seqs, most often consecutive: then kept as a range
        seqs = raw[3]
        if seqs and seqs[-1] - seqs[0] == len(seqs) - 1 and all(map(operator.eq, seqs, range(seqs[0], seqs[-1] + 1))):
            seqs = range(seqs[0], seqs[-1] + 1)
        return (SUBMITTED, raw[1], raw[2], seqs)
    return raw  # STARTED holds small tuples already; EXECUTOR and FLEET are one event each


def count(record: tuple) -> int:
    """Events in a (compact) record."""
    if record[0] == FINISHED:
        return len(record[3][0]) if record[3] else 0
    return len(record[3]) if record[0] <= STARTED else 1


def expand(record: tuple) -> Iterator[tuple]:
    """The per-task (or per-executor) events of one compact record, without their numbers."""
    code, at = record[0], record[1]
    if code == FINISHED:
        client = record[2]
        if not record[3]:
            return
        for seq, state, reason, executor, attempts, submitted, started, finished in zip(*record[3]):
            ran = started > 0
            yield ("finished", at, client, seq, executor, attempts, _OUTCOMES.get(state, str(state)),
                   max(0.0, started - submitted) if ran else None,
                   max(0.0, finished - started) if ran else None, reason[:REASON_CHARS])
    elif code == STARTED:
        executor = record[2]
        for client, seq, attempt in record[3]:
            yield ("started", at, client, seq, executor, attempt)
    elif code == SUBMITTED:
        client = record[2]
        for seq in record[3]:
            yield ("submitted", at, client, seq)
    else:  # EXECUTOR, FLEET: (code, at, what, id, host or type, detail)
        yield (record[2], at, record[3], record[4], record[5])


def failure(r: Any, client: str, at: float) -> dict:
    """A failed TaskResult as the dashboard's failures list shows it (exit code and stderr
    tail when its output is a command's)."""
    exit_code, tail = None, ""
    with contextlib.suppress(Exception):  # a Python task's output, or none: no exit code
        exit_code, _, stderr, _ = tk.decode_command_output(r.output)
        tail = stderr[-400:]
    return {"at": at, "client": client, "seq": r.seq, "executor": r.executor, "attempt": r.attempts,
            "exit_code": exit_code, "reason": r.reason[:REASON_CHARS], "stderr_tail": tail}


class History:
    """The latest `keep` events in memory, numbered from 1 up, as compact records (see
    :func:`compact`; expanded only when read), and on disk when given a folder: segments
    of about keep/2 events, the newest two kept, read back at the next start.

    Thread-safe: the observer adds, the loop reads for EventsRequest.
    """

    def __init__(self, keep: int, folder: str | os.PathLike | None = None):
        self.keep = keep
        self.lock = threading.Lock()
        self.chunks: collections.deque[tuple[int, int, tuple]] = collections.deque()  # (first number, events, record)
        self.count = 0  #: events held
        self.next = 1  #: the number the next event gets
        self.dropped = 0  #: events the observer could not keep up with (counted by it)
        self.folder = Path(folder) if folder else None
        self._segment: Any = None
        self._segment_events = 0
        if self.folder is not None:
            self._load()

    # ------------------------------------------------------------ writing (observer thread)

    def add(self, records: Iterable[tuple]) -> int:
        """Number and keep compact records' events; returns how many."""
        added = []
        with self.lock:
            for record in records:
                n = count(record)
                if n:
                    added.append((self.next, n, record))
                    self.next += n
            self.chunks.extend(added)
            total = sum(c[1] for c in added)
            self.count += total
            self._trim()
        if self.folder is not None and added:
            self._write(added, total)
        return total

    def _trim(self) -> None:
        while self.chunks and self.count - self.chunks[0][1] >= self.keep:
            self.count -= self.chunks.popleft()[1]

    def _write(self, added: list[tuple], total: int) -> None:
        try:
            if self._segment is None or self._segment_events >= max(1, self.keep // 2):
                self._rotate(added[0][0])
            self._segment.write(msgpack.packb(added, use_bin_type=True, default=list))  # a range as its list
            self._segment.flush()  # no fsync: the history is best-effort, the journal is not
            self._segment_events += total
        except OSError as exc:
            log.warning("event history in %s not written: %s", self.folder, exc)

    def _rotate(self, first: int) -> None:
        if self._segment is not None:
            self._segment.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._segment = open(self.folder / f"events-{first:012d}.msgpack", "ab")  # noqa: SIM115
        self._segment_events = 0
        for old in self._segments()[:-2]:
            with contextlib.suppress(OSError):
                old.unlink()

    def _segments(self) -> list[Path]:
        return sorted(self.folder.glob("events-*.msgpack"))

    def _load(self) -> None:
        """Read the segments a previous run left (the newest two), to go on numbering after them."""
        if not self.folder.is_dir():
            return
        loaded = 0
        for path in self._segments()[-2:]:
            try:
                with open(path, "rb") as fh:
                    for added in msgpack.Unpacker(fh, use_list=False, raw=False):
                        for first, n, record in added:
                            if first >= self.next:
                                self.chunks.append((first, n, record))
                                self.count += n
                                self.next = first + n
                                loaded += n
            except (OSError, ValueError, TypeError, msgpack.UnpackException) as exc:
                log.warning("event history %s: read up to a damaged part (%s)", path, exc)
        self._trim()
        if loaded:
            log.info("event history: %d events from %s, numbering goes on at %d", loaded, self.folder, self.next)

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    # ------------------------------------------------------------ reading (any thread)

    def read(self, after: int, since: float, limit: int) -> dict:
        """Events numbered above after and at or after wall time since, the oldest first, at
        most limit; with next, the number to ask after next time."""
        out: list[dict] = []
        with self.lock:
            chunks = list(self.chunks)  # records are never changed once added
            first = chunks[0][0] if chunks else self.next
            nxt, dropped = self.next, self.dropped
        starts = [c[0] for c in chunks]
        i = max(0, bisect.bisect_right(starts, after) - 1)
        last = after
        for start, n, record in chunks[i:]:
            if start + n - 1 <= after or record[1] < since:  # every event of a record has its time
                last = max(last, start + n - 1)
                continue
            for number, e in enumerate(expand(record), start):
                if number <= after:
                    continue
                if len(out) >= limit:
                    return {"events": out, "next": last, "first": first, "dropped": dropped, "more": True}
                out.append(as_map((number, *e)))
                last = number
        # With nothing new, next is the newest number: a follower whose dispatcher restarted
        # without its history (numbers from 1 again) goes on from there.
        return {"events": out, "next": last if out else nxt - 1, "first": first, "dropped": dropped,
                "more": False}
