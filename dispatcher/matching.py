"""Requirement matching: which executor runs a task with needs, and which task never can.

Tasks with needs wait in one :class:`NeedsClass` per distinct set of needs.  Each dispatch
turn, :meth:`Matcher.dispatch` places them, oldest class first, best fit by free cpus, and
holds an executor for a class that waited too long (a reservation), so large tasks are never
starved by small ones.  :meth:`Matcher.check` marks the classes no connected or launchable
executor can run.  Plain tasks never come here: the core dispatches them itself.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

from falconet import needs as nd
from falconet import protocol as p
from falconet.dispatcher.entries import Config, ExecutorEntry, ExecutorState, Task
from falconet.protocol import TaskState
from falconet.reports import Fleet

log = logging.getLogger("falconet.dispatcher")

_PENDING = int(TaskState.PENDING)
_UNSET = object()

#: takes up to n pending tasks from a queue and dispatches them to an executor (the core's hot loop)
Pop = Callable[[collections.deque[Task], ExecutorEntry, int, int], list[p.Assignment]]


class NeedsClass:
    """The queued tasks that share one set of needs, in submission order."""

    __slots__ = ("needs", "queue", "pending", "eligible", "gen", "blocked_since", "reserved",
                 "unschedulable", "unschedulable_since", "checked")

    def __init__(self, needs: nd.Needs):
        self.needs = needs
        self.queue: collections.deque[Task] = collections.deque()
        self.pending = 0  #: tasks of the queue still PENDING
        self.eligible: dict[bytes, ExecutorEntry] = {}  #: executors that satisfy the needs (by capacity)
        self.gen = -1  #: the registry generation eligible was computed for
        self.blocked_since: float | None = None  #: when a dispatch turn last placed none of it
        self.reserved: bytes | None = None  #: the executor held for its head task
        self.unschedulable = ""  #: why no connected or launchable executor can run it
        self.unschedulable_since = 0.0
        self.checked: tuple = ()  #: (registry generation, fleet reports) unschedulable was found for

    def head(self) -> Task | None:
        """The oldest pending task, dropping cancelled ones from the front."""
        q = self.queue
        while q and q[0].state != _PENDING:
            q.popleft()
        return q[0] if q else None


class Matcher:
    """The needs classes and the rules that place them on the core's executors."""

    def __init__(self, config: Config, executors: dict[bytes, ExecutorEntry],
                 ready: dict[bytes, ExecutorEntry], pop: Pop):
        self.config = config
        self.executors = executors  #: the core's registry (shared, never copied)
        self.ready = ready  #: the core's executors with credit, in turn order (shared)
        self.pop = pop
        self.classes: dict[nd.Needs, NeedsClass] = {}  #: tasks with needs, by needs
        #: bumped when an executor joins, leaves or changes: eligibility is recomputed
        self.gen = 0

    # ------------------------------------------------------------ classes

    def class_of(self, data: bytes) -> NeedsClass | str | None:
        """The class for needs as sent (made if new), None for plain ones, or why they are invalid."""
        try:
            needs = nd.decode(data)
        except p.ProtocolError as exc:
            return str(exc)
        if needs.plain:
            return None
        classes = self.classes
        if needs not in classes and len(classes) >= self.config.max_classes:
            for gone in [n for n, k in classes.items() if k.head() is None]:  # emptied by cancels
                del classes[gone]
            if len(classes) >= self.config.max_classes:
                return (f"{len(classes)} different sets of requirements are queued already, the "
                        "dispatcher's limit; give tasks fewer distinct requirements (tags are for "
                        "capabilities, not task names)")
        return self.class_for(needs)

    def class_for(self, needs: nd.Needs) -> NeedsClass:
        """The class of these needs, made if new."""
        cls = self.classes.get(needs)
        if cls is None:
            cls = self.classes[needs] = NeedsClass(needs)
        return cls

    def changed(self, peer: bytes, ex: ExecutorEntry | None) -> None:
        """An executor joined, re-registered or changed state (ex: its entry), or left (None).
        Classes whose eligible sets were current take it in or drop it here, at the cost of
        one satisfies() per class: recomputing them instead costs a scan of the registry per
        class on the next turn, which with 54,000 executors joining while tasks with needs
        wait made registration quadratic (6.7 ms a join; 0.15 ms with this, placing its tasks)."""
        current, self.gen = self.gen, self.gen + 1
        for cls in self.classes.values():
            if cls.gen != current:
                continue  # stale already: eligible() recomputes it when next needed
            if ex is not None and ex.caps.satisfies(cls.needs):
                cls.eligible[peer] = ex
            else:
                cls.eligible.pop(peer, None)
            cls.gen = self.gen

    def eligible(self, cls: NeedsClass) -> None:
        """Refresh the executors that satisfy the class, once per change of the registry
        that changed() did not apply."""
        if cls.gen != self.gen:
            cls.eligible = {peer: ex for peer, ex in self.executors.items() if ex.caps.satisfies(cls.needs)}
            cls.gen = self.gen

    # ------------------------------------------------------------ placement

    def dispatch(self, now: float, out: list[tuple[bytes, Any]]) -> set[bytes]:
        """Place tasks with needs, oldest class first, best fit by free cpus, appending the
        Tasks messages to out; returns the executors reserved, which plain tasks must leave
        alone this turn.

        Anti-starvation: a class whose head could not be placed for reserve_after_s reserves
        one executor that can hold it (the one with the most free cpus, kept from turn to
        turn).  A reserved executor gets no other work, so as its tasks end its cpus free up
        and the head is placed there: a large task waits for its cpus, never for ever.
        """
        reserved: dict[bytes, NeedsClass] = {}
        live = []
        for needs, cls in list(self.classes.items()):
            head = cls.head()
            if head is None:
                del self.classes[needs]
            else:
                live.append((head.submitted, cls))
        live.sort(key=lambda x: x[0])
        for _, cls in live:
            self.eligible(cls)
            if self.place(cls, reserved, now, out):
                cls.blocked_since = None
                cls.reserved = None
            elif cls.blocked_since is None:
                cls.blocked_since = now
            if cls.pending and cls.blocked_since is not None and now - cls.blocked_since >= self.config.reserve_after_s:
                self.reserve(cls, reserved)
        return set(reserved)

    def place(self, cls: NeedsClass, reserved: dict[bytes, NeedsClass], now: float,
              out: list[tuple[bytes, Any]]) -> int:
        """Give executors as many of the class's tasks as their credit and free cpus allow."""
        need = cls.needs
        fits = self._fits(cls, reserved)
        if not fits:
            return 0
        if need.prefer == "local":  # local executors first, the cloud only for what they cannot take
            fits.sort(key=lambda ex: (ex.caps.site != "local", ex.caps.cpus - ex.cpus_used))
        else:  # best fit: keep the large free blocks for the large tasks
            fits.sort(key=lambda ex: ex.caps.cpus - ex.cpus_used)
        placed = 0
        limit = self.config.max_dispatch_batch
        for ex in fits:
            n = min(ex.credit, (ex.caps.cpus - ex.cpus_used) // need.cpus, cls.pending, limit)
            if need.memory_mb:
                n = min(n, (ex.caps.memory_mb - ex.memory_used) // need.memory_mb)
            batch = self._take(cls, ex, n)
            if batch:
                placed += len(batch)
                ex.last_sent = now
                out.append((ex.peer, p.Tasks(batch)))
            if ex.credit <= 0:
                self.ready.pop(ex.peer, None)
            if not cls.pending:
                break
        return placed

    def _fits(self, cls: NeedsClass, reserved: dict[bytes, NeedsClass]) -> list[ExecutorEntry]:
        """The executors that can take one of the class's tasks now."""
        need = cls.needs
        # Only executors with credit can take a task: look through the fewer of the two.
        ready, eligible = self.ready, cls.eligible
        pool = [ex for peer, ex in ready.items() if peer in eligible] if len(ready) < len(eligible) \
            else [ex for ex in eligible.values() if ex.peer in ready]
        return [ex for ex in pool
                if ex.credit > 0 and ex.state is ExecutorState.ACTIVE and reserved.get(ex.peer, cls) is cls
                and ex.caps.cpus - ex.cpus_used >= need.cpus
                and ex.caps.memory_mb - ex.memory_used >= need.memory_mb]

    def _take(self, cls: NeedsClass, ex: ExecutorEntry, n: int) -> list[p.Assignment]:
        need = cls.needs
        batch = self.pop(cls.queue, ex, n, need.cpus)
        cls.pending -= len(batch)
        ex.credit -= len(batch)
        ex.cpus_used += need.cpus * len(batch)
        ex.memory_used += need.memory_mb * len(batch)
        return batch

    def reserve(self, cls: NeedsClass, reserved: dict[bytes, NeedsClass]) -> None:
        """Hold one executor for the class's head task (see dispatch)."""
        usable = [ex for ex in cls.eligible.values() if ex.state is ExecutorState.ACTIVE and ex.peer not in reserved]
        if not usable:
            return
        kept = next((ex for ex in usable if ex.peer == cls.reserved), None)
        ex = kept or max(usable, key=lambda e: (e.caps.cpus - e.cpus_used, -len(e.tasks)))
        if kept is None:
            log.info("executor %s reserved for tasks needing %s: they waited %.1fs for free cpus",
                     ex.info.executor_id, cls.needs, self.config.reserve_after_s)
        cls.reserved = ex.peer
        reserved[ex.peer] = cls

    # ------------------------------------------------------------ unschedulable tasks

    def check(self, now: float, fleet: Fleet | None, fleet_reports: int) -> list[tuple[NeedsClass, str]]:
        """Mark classes no connected or launchable executor can run; return those past the
        fail_unschedulable_s limit with the reason to fail their tasks with."""
        launchable: Any = _UNSET  # read once, and only if some class needs it
        key = (self.gen, fleet_reports)
        doomed = []
        for cls in list(self.classes.values()):
            if cls.checked == key:  # nothing changed since: only the clock below moves
                why = cls.unschedulable
            else:
                self.eligible(cls)
                if not cls.eligible and launchable is _UNSET:
                    launchable = launchable_types(fleet)
                why = "" if cls.eligible else why_unschedulable(cls.needs, self.executors, launchable)
                cls.checked = key
            if not why:
                cls.unschedulable = ""
                continue
            if not cls.unschedulable:
                cls.unschedulable_since = now
                log.warning("%d tasks needing %s are unschedulable: %s", cls.pending, cls.needs, why)
            cls.unschedulable = why
            limit = self.config.fail_unschedulable_s
            if limit > 0 and now - cls.unschedulable_since >= limit:
                waited = f" (failed after {limit:g}s, --fail-unschedulable)" if limit >= 1 else ""
                doomed.append((cls, f"unschedulable: {why}{waited}"))
        return doomed


def launchable_types(fleet: Fleet | None) -> list[tuple[str, nd.Caps]] | None:
    """What the provisioner's fleet report says it can launch, or None when no provisioner reports."""
    if fleet is None:
        return None
    return [(t.type, t.caps) for t in fleet.can_launch]


def why_unschedulable(need: nd.Needs, executors: dict[bytes, ExecutorEntry],
                      launchable: list[tuple[str, nd.Caps]] | None) -> str:
    """Empty if some connected executor or launchable type could run it, else why not."""
    if not executors and launchable is None:
        return ""  # nothing connected and no provisioner: executors may yet be started by hand
    reasons: dict[str, int] = {}
    for caps in [*(ex.caps for ex in executors.values()), *(caps for _name, caps in launchable or ())]:
        why = caps.why_not(need)
        if not why:
            return ""
        reasons[why] = reasons.get(why, 0) + 1
    where = f"{len(executors)} executors connected"
    if launchable is not None:
        where += f", {len(launchable)} instance types launchable"
    shown = "; ".join(f"{n}x {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
    return f"needs {need}: no executor can run it ({where}: {shown or 'none'})"
