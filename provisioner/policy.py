"""The scaling policy: a pure function from a snapshot of demand and fleet to a decision.

:func:`decide` reads no clock and calls no cloud; the provisioner's loop builds the
:class:`Snapshot`, applies the :class:`Decision` and carries ``Decision.streak`` into the next
snapshot.  That keeps every rule here testable as a table or a property.

Rules, in order (docs/provisioner.md says the same for users):

1. **Lease.** A node older than ``max_lifetime_s`` is released (drained, so its running
   tasks finish), busy or not: no instance outlives its lease.
2. **Demand.** Waiting tasks are grouped by shape: their needs (cpus, memory, arch, tags,
   where, prefer; :class:`falconet.needs.Needs`).  A type fits a shape when the executor it
   would run satisfies the needs by the one rule every part shares,
   :meth:`falconet.needs.Caps.satisfies`; so ``where=local`` never fits a cloud type and
   ``where=cloud`` never a local one, while ``prefer=local`` fits both (such a task waits
   only when the local executors are busy, so bursting to the cloud is what it asks for).
   A shape no instance type fits is reported unschedulable, with the reason, and launches
   nothing.  Each shape wants ``ceil(waiting / tasks_per_slot)`` tasks' worth of cpus; free
   cpus on nodes that fit the shape (registered or still booting) are used first, and what
   is left is the deficit.
3. **Growth.** The deficit is met with the cheapest type that fits the shape, at most
   ``step`` nodes this round: 1 (one-at-a-time), round+1 (additive), 2**round (exponential),
   or all (all-at-once), where round counts consecutive rounds that launched (Falkon's
   dynamic resource provisioning).  Growth stops at ``max_executors``, at the spending
   ``budget_usd`` (each new node is charged its minimum billing period up front), and while
   launches back off after a failure.  ``min_executors`` is kept even with no work.
4. **Shrink.** Only a registered node with no task for ``idle_release_s`` is released, and
   only when no waiting task fits it and ``min_executors`` would still be kept; the longest
   idle go first.  Busy and booting nodes are never released for scale-in.

Growth needs unmet demand and shrink needs a node that no waiting task can use, so a
decision never undoes the previous one on a steady queue: the policy does not flap.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from falconet.needs import Caps, Needs, executor_tags, site_of
from falconet.reports import Launchable


class Strategy(str, enum.Enum):
    """How many nodes one round may launch (Falkon's allocation policies)."""

    ONE_AT_A_TIME = "one-at-a-time"
    ADDITIVE = "additive"
    EXPONENTIAL = "exponential"
    ALL_AT_ONCE = "all-at-once"

    def step(self, round_: int) -> float:
        """Nodes allowed in the round after `round_` consecutive launching rounds."""
        if self is Strategy.ONE_AT_A_TIME:
            return 1
        if self is Strategy.ADDITIVE:
            return round_ + 1
        if self is Strategy.EXPONENTIAL:
            return 2 ** min(round_, 30)
        return math.inf


#: What one task needs (cpus, memory in MB, arch, tags, where, prefer): the dispatcher's
#: needs, so the policy and the dispatcher judge a fit by the same rule.  Shape() is a plain task.
Shape = Needs


@dataclass(frozen=True)
class InstanceType:
    """A kind of node the backend can start, with what it has and costs."""

    name: str
    vcpus: int
    memory_mb: int
    arch: str
    price_per_hour: float = 0.0
    slots: int = 0  #: task slots of its executor; 0: one per vCPU
    tags: frozenset[str] = frozenset()  #: its executor's tags (--executor-tag), site=... added
    site: str = "cloud"  #: where its executor runs: "cloud" or "local"

    @property
    def capacity(self) -> int:
        return self.slots or self.vcpus

    @functools.cached_property
    def caps(self) -> Caps:
        """What its executor will offer.  cpus is its capacity (slots, else vCPUs), the unit
        the policy counts room in; with --slots this differs from the CPUs the executor reports."""
        tags = executor_tags(self.tags, self.site)
        return Caps(self.capacity, self.memory_mb, self.arch, tags, site_of(tags))

    def fits(self, shape: Shape) -> bool:
        """True when its executor could ever run a task of this shape."""
        return self.caps.satisfies(shape)

    def launchable(self) -> Launchable:
        """The type as the provisioner reports it (`can_launch` in the fleet report)."""
        caps = self.caps
        return Launchable(self.name, caps.cpus, caps.memory_mb, caps.arch, tuple(sorted(caps.tags)), caps.site)


class NodeState(str, enum.Enum):
    """A node as the provisioner sees it."""

    BOOTING = "booting"  #: launched, no executor registered yet
    IDLE = "idle"  #: registered, no task
    BUSY = "busy"  #: registered, running or holding tasks
    RELEASING = "releasing"  #: asked to leave; stopped once it has


@dataclass(frozen=True)
class Node:
    """One node of the fleet: an instance (EC2) or an executor process (local)."""

    id: str
    itype: InstanceType
    state: NodeState
    busy: int = 0  #: tasks it holds
    idle_s: float = 0.0  #: seconds without a task, for registered nodes
    age_s: float = 0.0  #: seconds since launch
    cpus_used: int | None = None  #: cpus its tasks hold, as the dispatcher reports; None: one a task

    @property
    def free(self) -> int:
        used = self.busy if self.cpus_used is None else self.cpus_used
        return max(0, self.itype.capacity - used)


@dataclass(frozen=True)
class Params:
    """The user's bounds on the fleet; times in seconds."""

    types: tuple[InstanceType, ...]
    strategy: Strategy = Strategy.ADDITIVE
    min_executors: int = 0
    max_executors: int = 16
    tasks_per_slot: float = 1.0
    idle_release_s: float = 60.0
    max_lifetime_s: float = 0.0  #: 0: no lease
    budget_usd: float = 0.0  #: 0: no cap
    min_charge_s: float = 60.0  #: a started instance is billed at least this long


@dataclass(frozen=True)
class Snapshot:
    """Everything the policy looks at, taken at one moment."""

    waiting: Mapping[Shape, int]  #: queued tasks by shape
    nodes: tuple[Node, ...] = ()
    spent_usd: float = 0.0  #: estimated spend of the fleet so far
    streak: int = 0  #: consecutive rounds that launched (Decision.streak of the last round)
    backoff_s: float = 0.0  #: seconds left before launches may be tried again
    backoff_reason: str = ""


@dataclass(frozen=True)
class Launch:
    """Start `count` nodes of `itype` for tasks of `shape`."""

    itype: InstanceType
    count: int
    shape: Shape


@dataclass(frozen=True)
class Decision:
    """What to do this round, and why (one line per action or refusal)."""

    launch: tuple[Launch, ...] = ()
    release: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    unschedulable: tuple[str, ...] = ()  #: why some waiting tasks can never run
    streak: int = 0

    @property
    def launched(self) -> int:
        return sum(x.count for x in self.launch)


def decide(snap: Snapshot, params: Params) -> Decision:
    """The decision for one round; see the module docstring for the rules."""
    reasons: list[str] = []
    live = [n for n in snap.nodes if n.state is not NodeState.RELEASING]
    release = _leases_over(live, params, reasons)
    live = [n for n in live if n.id not in release]
    deficits, unschedulable = _deficits(snap, params, live)
    launches = _launches(snap, params, len(live), deficits, reasons)
    if not launches:
        release += _idle_release(snap, params, live, reasons)
    streak = snap.streak + 1 if launches else 0
    return Decision(tuple(launches), tuple(release), tuple(reasons), tuple(unschedulable), streak)


Deficit = tuple[InstanceType, int, Shape, str]  #: (type, nodes of it wanted, for what shape, why)


def _leases_over(live: list[Node], params: Params, reasons: list[str]) -> list[str]:
    """1. Nodes whose lease (--max-lifetime) is over."""
    if params.max_lifetime_s <= 0:
        return []
    over = [n for n in live if n.age_s >= params.max_lifetime_s]
    reasons += [f"release {n.id}: lease of {params.max_lifetime_s:g}s is over (age {n.age_s:.0f}s); it drains first"
                for n in over]
    return [n.id for n in over]


def _deficits(snap: Snapshot, params: Params, live: list[Node]) -> tuple[list[Deficit], list[str]]:
    """2. Demand: what the waiting tasks need beyond the live nodes' free room, largest shapes
    first so they get the big free blocks; and the shapes no type can run."""
    free = {n.id: n.free for n in live}
    deficits: list[Deficit] = []
    unschedulable: list[str] = []
    for shape in sorted((s for s, w in snap.waiting.items() if w > 0), reverse=True):
        waiting = snap.waiting[shape]
        fitting = [t for t in params.types if t.fits(shape)]
        if not fitting:
            unschedulable.append(_unschedulable(shape, waiting, params.types))
            continue
        want = math.ceil(waiting / params.tasks_per_slot)  # tasks worth a slot of their own
        for n in live:
            if want <= 0:
                break
            if n.itype.fits(shape):
                take = min(want, free[n.id] // shape.cpus)
                free[n.id] -= take * shape.cpus
                want -= take
        if want > 0:
            cheapest = min(fitting, key=lambda t: (t.price_per_hour, t.vcpus, t.name))
            per_node = cheapest.capacity // shape.cpus
            deficits.append((cheapest, math.ceil(want / per_node), shape, f"{waiting} tasks need {shape}"))
    return deficits, unschedulable


def _launches(snap: Snapshot, params: Params, n_live: int, deficits: list[Deficit],
              reasons: list[str]) -> list[Launch]:
    """3. Growth: the deficits (and the minimum) within the strategy's step, the room under
    --max-executors, the backoff and the budget."""
    launches: list[Launch] = []
    room = params.max_executors - n_live
    spend = snap.spent_usd
    wanted = sum(d[1] for d in deficits)
    short = params.min_executors - n_live - wanted
    if short > 0:
        cheapest = min(params.types, key=lambda t: (t.price_per_hour, t.vcpus, t.name))
        deficits = [*deficits, (cheapest, short, Shape(), f"--min-executors is {params.min_executors}")]
        wanted += short
    step = params.strategy.step(snap.streak)
    allowed = min(step, room)
    if wanted and snap.backoff_s > 0:  # holds read the same each round, so status keeps one
        reasons.append(f"hold: launches back off after a failure: {snap.backoff_reason}")
        allowed = 0
    elif wanted and room <= 0:
        reasons.append(f"hold: more nodes wanted, the fleet is at --max-executors {params.max_executors}")
    for itype, count, shape, why in deficits:
        n = int(min(count, allowed))
        if params.budget_usd > 0 and itype.price_per_hour > 0:
            each = itype.price_per_hour * params.min_charge_s / 3600  # charged up front
            left = params.budget_usd - spend
            if n * each > left + 1e-9:  # some do not fit; then left / each < n, so it is finite
                affordable = 0 if left <= 0 or each <= 0 else min(n, math.floor(left / each + 1e-9))
                reasons.append(f"hold: more {itype.name} would pass the budget of ${params.budget_usd:.2f}")
                n = affordable
            spend += n * each
        if n <= 0:
            continue
        allowed -= n
        launches.append(Launch(itype, n, shape))
        reasons.append(f"launch {n} {itype.name}: {why}; {count} wanted, "
                       f"{params.strategy.value} allows {_fmt(step)} this round")
    return launches


def _idle_release(snap: Snapshot, params: Params, live: list[Node], reasons: list[str]) -> list[str]:
    """4. Shrink: nodes idle past the limit, useless to every waiting task, above the minimum."""
    waiting_shapes = [s for s, w in snap.waiting.items() if w > 0]
    idle = sorted((n for n in live if n.state is NodeState.IDLE and n.idle_s >= params.idle_release_s),
                  key=lambda n: -n.idle_s)
    release: list[str] = []
    count = len(live)
    for n in idle:
        if count <= params.min_executors:
            break
        if any(n.itype.fits(s) for s in waiting_shapes):
            continue
        release.append(n.id)
        count -= 1
        reasons.append(f"release {n.id}: idle {n.idle_s:.0f}s (limit {params.idle_release_s:g}s)")
    return release


def _unschedulable(shape: Shape, waiting: int, types: tuple[InstanceType, ...]) -> str:
    """One line: how many tasks need what, and why the first few types cannot run them."""
    names = ", ".join(t.name for t in types[:6]) + (", ..." if len(types) > 6 else "")
    why = "; ".join(f"{t.name}: {t.caps.why_not(shape)}" for t in types[:2])
    return f"{waiting} tasks need {shape}, which none of the instance types ({names}) has ({why})"


def _fmt(x: float) -> str:
    return "all" if x == math.inf else str(int(x))
