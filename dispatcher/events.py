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


def expand(raw: tuple) -> Iterator[tuple]:
    """The per-task (or per-executor) events of one raw record, without their numbers."""
    code, at = raw[0], raw[1]
    if code == FINISHED:
        client = raw[2]
        for r in raw[3]:
            outcome = _OUTCOMES.get(r.state, str(r.state))
            ran = r.started > 0
            yield ("finished", at, client, r.seq, r.executor, r.attempts, outcome,
                   max(0.0, r.started - r.submitted) if ran else None,
                   max(0.0, r.finished - r.started) if ran else None,
                   r.reason[:REASON_CHARS])
    elif code == STARTED:
        executor = raw[2]
        for client, seq, attempt in raw[3]:
            yield ("started", at, client, seq, executor, attempt)
    elif code == SUBMITTED:
        client = raw[2]
        for spec in raw[3]:
            yield ("submitted", at, client, spec.seq)
    else:  # EXECUTOR, FLEET: (code, at, what, id, host or type, detail)
        yield (raw[2], at, raw[3], raw[4], raw[5])


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
    """The latest `keep` events in memory, numbered from 1 up, in chunks (one per drain), and
    on disk when given a folder: segments of about keep/2 events, the newest two kept.

    Thread-safe: the observer appends, the loop reads for EventsRequest.
    """

    def __init__(self, keep: int, folder: str | os.PathLike | None = None):
        self.keep = keep
        self.lock = threading.Lock()
        self.chunks: collections.deque[tuple[int, list[tuple]]] = collections.deque()  # (first number, events)
        self.count = 0  #: events held
        self.next = 1  #: the number the next event gets
        self.dropped = 0  #: events the observer could not keep up with (counted by it)
        self.folder = Path(folder) if folder else None
        self._segment: Any = None
        self._segment_events = 0
        if self.folder is not None:
            self._load()

    # ------------------------------------------------------------ writing (observer thread)

    def add(self, events: Iterable[tuple]) -> int:
        """Number and keep events (tuples without their number); returns how many."""
        with self.lock:
            n = self.next
            chunk = [(n + i, *e) for i, e in enumerate(events)]
            if not chunk:
                return 0
            self.chunks.append((n, chunk))
            self.next = n + len(chunk)
            self.count += len(chunk)
            while self.count - len(self.chunks[0][1]) >= self.keep:
                self.count -= len(self.chunks.popleft()[1])
        if self.folder is not None:
            self._write(chunk)
        return len(chunk)

    def _write(self, chunk: list[tuple]) -> None:
        try:
            if self._segment is None or self._segment_events >= max(1, self.keep // 2):
                self._rotate(chunk[0][0])
            self._segment.write(msgpack.packb(chunk, use_bin_type=True))
            self._segment.flush()  # no fsync: the history is best-effort, the journal is not
            self._segment_events += len(chunk)
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
                    for chunk in msgpack.Unpacker(fh, use_list=False, raw=False):
                        chunk = [tuple(e) for e in chunk]
                        self.chunks.append((chunk[0][0], chunk))
                        self.count += len(chunk)
                        self.next = chunk[-1][0] + 1
                        loaded += len(chunk)
            except (OSError, ValueError, msgpack.UnpackException, IndexError) as exc:
                log.warning("event history %s: read up to a damaged part (%s)", path, exc)
        while self.chunks and self.count - len(self.chunks[0][1]) >= self.keep:
            self.count -= len(self.chunks.popleft()[1])
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
            chunks = list(self.chunks)  # chunk lists are never changed once added
            first = chunks[0][0] if chunks else self.next
            nxt, dropped = self.next, self.dropped
        starts = [c[0] for c in chunks]
        i = max(0, bisect.bisect_right(starts, after) - 1)
        last = after
        for _, chunk in chunks[i:]:
            for e in chunk:
                if e[0] <= after or e[2] < since:
                    last = max(last, e[0])
                    continue
                if len(out) >= limit:
                    return {"events": out, "next": last, "first": first, "dropped": dropped, "more": True}
                out.append(as_map(e))
                last = e[0]
        # With nothing new, next is the newest number: a follower whose dispatcher restarted
        # without its history (numbers from 1 again) goes on from there.
        return {"events": out, "next": last if out else nxt - 1, "first": first, "dropped": dropped,
                "more": False}
