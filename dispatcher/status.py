"""The dispatcher's statistics: the status clients, the CLI and the provisioner read (typed in
:mod:`falconet.reports`).

Read-only: nothing here changes the core.  :class:`Rate` counts completions for the tasks/s
figure (the core notes each report's count, once per report, not per task).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from falconet import needs as nd
from falconet import protocol as p
from falconet.dispatcher.entries import ClientEntry, ExecutorEntry, Task
from falconet.protocol import TaskState
from falconet.reports import ExecutorRow, Status, Waiting

if TYPE_CHECKING:
    from falconet.dispatcher.core import Core
    from falconet.dispatcher.matching import NeedsClass

_PENDING, _RUNNING = int(TaskState.PENDING), int(TaskState.RUNNING)
_STATE_NAMES = {int(s): s.name.lower() for s in TaskState}


class Rate:
    """Completions per second over a sliding window, in one-second buckets (bounded memory)."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.times: collections.deque[list[int]] = collections.deque()  # [second, count]

    def note(self, now: float, n: int) -> None:
        """Count n completions at monotonic time now."""
        times = self.times
        if times and times[-1][0] == int(now):
            times[-1][1] += n
        else:
            times.append([int(now), n])
            while times[0][0] < now - self.window_s - 1:
                times.popleft()

    def per_s(self, now: float) -> float:
        """Completions per second over the last window."""
        times = self.times
        while times and times[0][0] < now - self.window_s:
            times.popleft()
        if not times:
            return 0.0
        span = max(now - times[0][0], 1.0)
        return sum(n for _, n in times) / span


def status_report(core: Core, now: float, detail: bool = False, client: ClientEntry | None = None) -> Status:
    """The dispatcher's statistics."""
    executors = core.executors.values()
    heads = [next((t for t in c.queue if t.state == _PENDING), None) for c in core.clients.values() if c.queue]
    waits, unschedulable = waiting(core.counts[_PENDING], [t for t in heads if t is not None], core.classes.values(),
                                   core.wall(), now)
    extra = {name: report() for name, report in core.reporters.items()}  # security, journal, blobs
    if client is not None:
        extra["client"] = {_STATE_NAMES[s]: n for s, n in enumerate(client.counts)}
    if detail:
        extra["detail"] = True
        extra["executor_table"] = tuple(executor_row(ex, now) for ex in executors)
        extra["recent_lost"] = tuple(core.recent_lost)
        if core.fleet is not None:
            extra["fleet"] = dataclasses.replace(core.fleet, reported_s=core.wall() - core.fleet_at)
    return Status(
        dispatcher_id=core.dispatcher_id,
        version=p.PROTOCOL_VERSION,
        uptime_s=core.wall() - core.started_wall,
        durability="in-memory" if core.journal is None else "journal",
        unacknowledged_results=sum(len(c.unacked) for c in core.clients.values()),
        queued=core.counts[_PENDING],
        tasks={_STATE_NAMES[s]: n for s, n in enumerate(core.counts)},
        submitted_total=core.submitted_total,
        tasks_per_s=core.rate.per_s(now),
        executors=len(core.executors),
        slots=sum(ex.info.slots for ex in executors),
        busy=sum(len(ex.tasks) for ex in executors),
        lost_executors=core.lost_total,
        stale_results=core.stale_results,
        clients=len(core.clients),
        endpoints=core.endpoints,
        waiting=waits,
        unschedulable=unschedulable,
        input_cache=dict(core.cache_totals),
        **extra,
    )


def waiting(pending: int, plain_heads: Iterable[Task], classes: Iterable[NeedsClass], wall: float,
            now: float) -> tuple[tuple[Waiting, ...], tuple[Waiting, ...]]:
    """Queued tasks by needs (for the provisioner), and the classes no executor can run.

    pending counts every queued task; the plain ones are what the classes do not hold, and
    plain_heads are the oldest pending plain task of each client."""
    classes = list(classes)
    waits, unschedulable = [], []
    plain = pending - sum(cls.pending for cls in classes)
    if plain > 0:
        head = min(plain_heads, key=lambda t: t.submitted, default=None)  # each client's oldest
        waits.append(Waiting(nd.PLAIN, plain, wall - head.submitted if head else 0.0))
    for cls in classes:
        head = cls.head()
        if head is None:
            continue
        entry = Waiting(cls.needs, cls.pending, wall - head.submitted)
        waits.append(entry)
        if cls.unschedulable:
            unschedulable.append(dataclasses.replace(entry, reason=cls.unschedulable,
                                                     since_s=now - cls.unschedulable_since))
    return tuple(waits), tuple(unschedulable)


def executor_row(ex: ExecutorEntry, now: float) -> ExecutorRow:
    """One executor's line of the status's executor table."""
    i = ex.info
    return ExecutorRow(
        id=i.executor_id, host=i.hostname, addresses=tuple(i.addresses), pid=i.pid,
        cpus=i.cpus, memory_mb=ex.caps.memory_mb, platform=i.platform, slots=i.slots,
        state=ex.state.value, busy=sum(1 for t in ex.tasks.values() if t.state == _RUNNING),
        assigned=len(ex.tasks), completed=ex.completed, last_seen_s=now - ex.last_seen,
        idle_s=0.0 if ex.tasks else now - ex.idle_since, registered=ex.registered,
        arch=ex.caps.arch, site=ex.caps.site, tags=tuple(sorted(ex.caps.tags)),
        cpus_used=ex.cpus_used, memory_used_mb=ex.memory_used, facts=i.facts, stats=ex.stats,
    )


def note_stats(totals: dict[str, int], ex: ExecutorEntry, stats: dict) -> None:
    """Keep an executor's statistics and add its new input-cache counts to the totals."""
    old, new = ex.stats.get("cache"), stats.get("cache")
    old = old if type(old) is dict else {}
    if type(new) is dict:
        for k in totals:
            a, b = new.get(k, 0), old.get(k, 0)
            if type(a) is int and type(b) is int and a > b:
                totals[k] += a - b
    ex.stats = stats
