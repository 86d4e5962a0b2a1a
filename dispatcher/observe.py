"""What operators watch, kept off the dispatcher's hot loop.

The loop does two cheap things: it hands over each turn's raw event records (references,
one per batch: :mod:`.events`) and, about once a second, publishes a :class:`Snapshot`
of its status and counters.  A thread of this module compacts the events (history,
histograms of task wait and run time, the latest failures) and keeps a few minutes of
the snapshots' figures for the dashboard's chart.  Readers (the HTTP side, EventsRequest)
only ever see what was published: nothing here can change the dispatcher.

Bounds: the raw hand-over holds at most :data:`MAX_RAW` records (a thread that falls
behind drops the oldest and counts the events lost); the history holds ``keep`` events;
the chart :data:`SERIES_POINTS` points; failures the latest :data:`FAILURES`.
"""

from __future__ import annotations

import bisect
import collections
import logging
import operator
import threading
import time
from typing import NamedTuple

from falconet.dispatcher import events as ev

log = logging.getLogger("falconet.dispatcher")

_FAILED = int(ev.TaskState.FAILED)
_NEVER = 1e8  #: seconds: a wait or run time beyond this is a task that never ran (started == 0)
MAX_RAW = 50_000  #: raw records waiting for the observer thread
SERIES_POINTS = 600  #: chart points kept: ten minutes at one a second
FAILURES = 20  #: latest failures shown
DRAIN_S = 0.2  #: how often the thread drains the loop's records
SNAPSHOT_COST_SHARE = 0.02  #: a snapshot may take at most this share of the loop's time

#: upper bounds (seconds) of the histograms' buckets
TASK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0, 1800.0, 7200.0)
TURN_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0)


class Histogram:
    """Counts per bucket (the last one is +Inf), their sum and count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def observe_sorted(self, values: list[float]) -> None:
        """Count many values at once, sorted: a bisection per bucket, not a Python step per value."""
        if not values:
            return
        below = 0
        for i, bound in enumerate(self.bounds):
            at_or_below = bisect.bisect_right(values, bound)
            self.counts[i] += at_or_below - below
            below = at_or_below
        self.counts[-1] += len(values) - below
        self.sum += sum(values)
        self.count += len(values)

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, count at or below)], ending with +Inf, as Prometheus wants them."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out

    def copy(self) -> Histogram:
        h = Histogram(self.bounds)
        h.counts, h.sum, h.count = list(self.counts), self.sum, self.count
        return h


class Snapshot(NamedTuple):
    """What the loop published: its status map and counters, at wall time `at`."""

    at: float
    status: dict  #: Status.to_map() with detail: what `falconet status --json` prints
    status_json: bytes  #: the same, encoded once (a big table must not be encoded per reader)
    executors_by_state: dict  #: ExecutorState value -> executors
    messages: dict  #: (port, direction) -> messages
    turns: Histogram  #: the loop's turn durations
    cost_s: float  #: how long building this snapshot took the loop


class Observer:
    """The loop's side (note, due, publish) and the readers' side (snapshot, dashboard, ...)."""

    def __init__(self, keep_events: int = 100_000, folder: str | None = None, interval_s: float = 1.0,
                 timings: bool = True):
        """timings: keep the histograms of task wait and run time (for /metrics)."""
        self.interval_s = interval_s
        self.timings = timings
        self.history = ev.History(keep_events, folder) if keep_events > 0 else None
        self.snapshot: Snapshot | None = None
        self.next_snapshot = 0.0  #: monotonic time the loop publishes again
        self._raw: collections.deque[list[tuple]] = collections.deque()
        self.lock = threading.Lock()  # guards what the thread derives: the readers copy under it
        self.series: collections.deque[tuple] = collections.deque(maxlen=SERIES_POINTS)
        self.failures: collections.deque[dict] = collections.deque(maxlen=FAILURES)
        self.wait = Histogram(TASK_BUCKETS)
        self.run = Histogram(TASK_BUCKETS)
        self.recorded = 0  #: events recorded
        self.dropped = 0  #: events lost because the thread fell behind
        self._wake = threading.Event()
        self._stop = False
        self._seen_snapshot: Snapshot | None = None
        self.thread = threading.Thread(target=self._run, name="falconet-observer", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ the loop's side

    def note(self, records: list[tuple]) -> None:
        """Hand over one turn's raw event records (a list the loop no longer touches)."""
        raw = self._raw
        if len(raw) >= MAX_RAW:
            lost = raw.popleft()
            self.dropped += sum(len(r[3]) if r[0] <= ev.FINISHED else 1 for r in lost)
        raw.append(records)

    def due(self, now: float) -> bool:
        return now >= self.next_snapshot

    def publish(self, snap: Snapshot, now: float) -> None:
        """Publish a snapshot; the next is due in a second, or later if this one was costly
        (at most SNAPSHOT_COST_SHARE of the loop's time: 54,000 executors make a big table)."""
        self.snapshot = snap
        self.next_snapshot = now + max(self.interval_s, snap.cost_s / SNAPSHOT_COST_SHARE)
        self._wake.set()

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(DRAIN_S)
            self._wake.clear()
            try:
                self.drain()
            except Exception:  # an observer bug must not take the dispatcher with it
                log.exception("observer: events not processed")

    def drain(self) -> None:
        """Expand what the loop handed over; add a chart point for a new snapshot."""
        waiting = self._raw
        while waiting:
            records = waiting.popleft()
            compacted = [ev.compact(r) for r in records]
            with self.lock:
                for raw, record in zip(records, compacted):
                    if raw[0] == ev.FINISHED and record[3]:
                        self._finished(raw, record[3])
                self.recorded += sum(map(ev.count, compacted))
            if self.history is not None:
                self.history.dropped = self.dropped
                self.history.add(compacted)
        snap = self.snapshot
        if snap is not None and snap is not self._seen_snapshot:
            self._seen_snapshot = snap
            s = snap.status
            tasks = s.get("tasks", {})
            with self.lock:
                self.series.append((snap.at, s.get("tasks_per_s", 0.0), s.get("queued", 0),
                                    tasks.get("running", 0) + tasks.get("dispatched", 0),
                                    s.get("busy", 0), s.get("slots", 0)))

    def _finished(self, raw: tuple, cols: tuple) -> None:
        """Histograms and failures from one client's results of a turn: the raw FINISHED
        record and its columns (seq, state, reason, executor, attempts, submitted, started,
        finished).  Per-task work stays in C: map, sorted, bisect."""
        if self.timings:
            submitted, started, finished = cols[5], cols[6], cols[7]
            waits = sorted(map(operator.sub, started, submitted))
            runs = sorted(map(operator.sub, finished, started))
            # A task that never ran has started == 0: a wait of minus the epoch, a run of the epoch.
            self.wait.observe_sorted(waits[bisect.bisect_left(waits, -_NEVER):])
            self.run.observe_sorted(runs[:bisect.bisect_right(runs, _NEVER)])
        if _FAILED in cols[1]:  # rare: look at each only then
            self.failures.extend(ev.failure(res, raw[2], raw[1]) for res in raw[3] if res.state == _FAILED)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=2.0)
        try:
            self.drain()  # what the last turns handed over still reaches the history
        finally:
            if self.history is not None:
                self.history.close()

    # ------------------------------------------------------------ readers

    def events(self, after: int, since: float, limit: int) -> dict:
        """An EventsRequest's answer (the loop calls this)."""
        assert self.history is not None
        return self.history.read(after, since, limit)

    def histograms(self) -> tuple[Histogram, Histogram]:
        """Copies of the task wait and run time histograms."""
        with self.lock:
            return self.wait.copy(), self.run.copy()

    def dashboard(self) -> dict:
        """What the dashboard page polls: the status, the chart's series, the latest failures."""
        snap = self.snapshot
        with self.lock:
            series = list(self.series)
            failures = list(self.failures)
            recorded, dropped = self.recorded, self.dropped
        names = ("t", "tasks_per_s", "queued", "running", "busy", "slots")
        return {"at": snap.at if snap else time.time(), "status": snap.status if snap else {},
                "history": {name: [p[i] for p in series] for i, name in enumerate(names)},
                "failures": failures, "events": {"recorded": recorded, "dropped": dropped}}
