"""Property tests of the scaling policy: every rule in policy.py's docstring, on any snapshot.

The cases draw instance types, waiting shapes, a fleet in any state and any bounds; each
``check_*`` function tests one rule of one decision against the snapshot it was given.  The
round tests apply a decision the way the provisioner's loop does (launches become booting
nodes, releases become releasing ones, ``Decision.streak`` is carried) and decide again:
no flapping, eventual coverage of a constant queue, and a steady state left alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from falconet.provisioner.policy import (
    Decision,
    InstanceType,
    Node,
    NodeState,
    Params,
    Shape,
    Snapshot,
    Strategy,
    decide,
)

# about half the cases qualify for a flap test
FLAP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
ROUNDS = settings(max_examples=120, deadline=None)  # each example decides up to ~70 times

ARCHES = ("x86_64", "arm64")
EPS = 1e-6  # dollars: the policy rounds affordable counts with a 1e-9 slack per node

# ---------------------------------------------------------------- strategies


TYPE_TAGS = ("gpu", "zone=a")  #: --executor-tag words a type's executors may carry
SITES = ("cloud", "local")


@st.composite
def instance_types(draw, min_size: int = 1, site: str | None = None) -> tuple[InstanceType, ...]:
    """1-4 types with unique names, all of one backend's site; a few with executor slots other
    than one per vCPU, some with executor tags."""
    n = draw(st.integers(min_size, 4))
    site = site or draw(st.sampled_from(SITES))
    return tuple(
        InstanceType(
            name=f"t{i}",
            vcpus=draw(st.integers(1, 16)),
            memory_mb=draw(st.sampled_from([512, 2048, 8192, 32768])),
            arch=draw(st.sampled_from(ARCHES)),
            price_per_hour=draw(st.sampled_from([0.0, 0.01, 0.1]) | st.floats(0, 2)),
            slots=draw(st.sampled_from([0, 0, 0, 0, 1, 4])),
            tags=frozenset(draw(st.sets(st.sampled_from(TYPE_TAGS), max_size=2))),
            site=site,
        )
        for i in range(n)
    )


def _needs(cpus, memory_mb, arch, tags, where_prefer) -> Shape:
    return Shape(cpus, memory_mb, arch, tuple(sorted(tags)), *where_prefer)


# prefer=local goes with where=any only (needs.make refuses the others)
WHERE_PREFER = st.sampled_from([("any", ""), ("any", ""), ("any", ""), ("local", ""), ("cloud", ""),
                                ("any", "local")])
TASK_TAGS = st.sets(st.sampled_from([*TYPE_TAGS, "fpga", "site=cloud", "site=local"]), max_size=2)
SHAPES = st.builds(
    _needs,
    cpus=st.integers(1, 4) | st.integers(1, 16),
    memory_mb=st.sampled_from([0, 0, 1024, 4096, 16384, 65536]),
    arch=st.sampled_from(["", "", *ARCHES]),
    tags=st.just(set()) | TASK_TAGS,
    where_prefer=WHERE_PREFER,
)
SMALL_SHAPES = st.builds(Shape, cpus=st.integers(1, 2), memory_mb=st.sampled_from([0, 512]),
                         arch=st.sampled_from(["", "", *ARCHES]))


@st.composite
def fitting_shapes(draw, types: tuple[InstanceType, ...]) -> Shape:
    """A shape some type holds."""
    itype = draw(st.sampled_from(types))
    tags = draw(st.sets(st.sampled_from(sorted(type_tags(itype))), max_size=2))
    where = draw(st.sampled_from(["any", "any", itype.site]))
    prefer = draw(st.sampled_from(["", "local"])) if where == "any" else ""
    return Shape(cpus=draw(st.integers(1, capacity(itype))), memory_mb=draw(st.sampled_from([0, 512, itype.memory_mb])),
                 arch=draw(st.sampled_from(["", itype.arch])), tags=tuple(sorted(tags)), where=where, prefer=prefer)


def waiting_for(types: tuple[InstanceType, ...], most: int = 500, min_size: int = 0) -> st.SearchStrategy:
    """0-3 shapes, most of them schedulable, with 0 to `most` tasks each."""
    shapes = fitting_shapes(types) | SHAPES
    return st.dictionaries(shapes, st.integers(0, 20) | st.integers(0, most), min_size=min_size, max_size=3)


@st.composite
def fleets(draw, types: tuple[InstanceType, ...], states=tuple(NodeState)) -> tuple[Node, ...]:
    """Up to 10 nodes with unique ids, of the given types, in any of `states`."""
    nodes = []
    for i in range(draw(st.integers(0, 10))):
        itype = draw(st.sampled_from(types))
        state = draw(st.sampled_from(states))
        busy = draw(st.integers(1, capacity(itype) + 1)) if state is NodeState.BUSY else 0
        # the dispatcher reports the cpus its tasks hold (a task of several cpus holds more than one)
        cpus_used = draw(st.none() | st.integers(busy, 2 * busy + 1)) if busy else None
        nodes.append(Node(f"n{i}", itype, state, busy=busy,
                          idle_s=draw(st.sampled_from([0.0, 59.0, 60.0]) | st.floats(0, 1000)),
                          age_s=draw(st.sampled_from([0.0, 600.0]) | st.floats(0, 5000)),
                          cpus_used=cpus_used))
    return tuple(nodes)


@st.composite
def params_for(draw, types: tuple[InstanceType, ...]) -> Params:
    """Any strategy and bounds, including min above max and a fleet already over max."""
    return Params(
        types=types,
        strategy=draw(st.sampled_from(list(Strategy))),
        min_executors=draw(st.integers(0, 8)),
        max_executors=draw(st.integers(0, 64)),
        tasks_per_slot=draw(st.sampled_from([1.0, 1.0, 2.0, 2.5, 10.0])),
        idle_release_s=draw(st.sampled_from([0.0, 60.0, 300.0])),
        max_lifetime_s=draw(st.sampled_from([0.0, 0.0, 600.0, 3600.0])),
        budget_usd=draw(st.sampled_from([0.0, 0.0, 0.05, 1.0]) | st.floats(0, 10)),
        min_charge_s=draw(st.sampled_from([0.0, 1.0, 60.0, 3600.0])),
    )


@st.composite
def cases(draw, backoff: bool = True, empty_queue: bool = False,
          states=tuple(NodeState)) -> tuple[Snapshot, Params]:
    """A snapshot and the params it is decided under; `backoff=False` for rounds that may launch."""
    types = draw(instance_types())
    waiting = waiting_for(types)
    snap = Snapshot(
        waiting=draw(st.just({}) | waiting if empty_queue else waiting),
        nodes=draw(fleets(types, states)),
        spent_usd=draw(st.sampled_from([0.0, 0.0, 1.0]) | st.floats(0, 10)),
        streak=draw(st.integers(0, 3) | st.integers(0, 40)),
        backoff_s=draw(st.sampled_from([0.0, 0.0, 0.0, 30.0])) if backoff else 0.0,
        backoff_reason="RunInstances failed: InsufficientInstanceCapacity",
    )
    return snap, draw(params_for(types))


# ---------------------------------------------------------------- helpers
#
# The checks judge fit, capacity and step with their own copies of the rules, so a mistake
# in InstanceType.fits or Strategy.step cannot make the policy and its oracle agree.


def capacity(itype: InstanceType) -> int:
    return itype.slots if itype.slots else itype.vcpus


def type_tags(itype: InstanceType) -> set[str]:
    """The tags its executors report: their own, and the site of the backend."""
    return {*itype.tags, f"site={itype.site}"}


def fits(itype: InstanceType, shape: Shape) -> bool:
    return (shape.cpus <= capacity(itype) and shape.memory_mb <= itype.memory_mb
            and shape.arch in ("", itype.arch) and shape.where in ("any", itype.site)
            and set(shape.tags) <= type_tags(itype))


def used(node: Node) -> int:
    return node.busy if node.cpus_used is None else node.cpus_used


def free_slots(nodes, shape: Shape) -> int:
    """Slots of `shape` the nodes could still take, each on its own."""
    return sum(max(0, capacity(n.itype) - used(n)) // shape.cpus for n in nodes if fits(n.itype, shape))


def step(strategy: Strategy, streak: int) -> float:
    return {Strategy.ONE_AT_A_TIME: 1, Strategy.ADDITIVE: streak + 1,
            Strategy.EXPONENTIAL: 2 ** min(streak, 30), Strategy.ALL_AT_ONCE: math.inf}[strategy]


def cheapest(types, shape: Shape | None = None) -> InstanceType:
    """The cheapest type (that fits `shape`), ties to the smaller, then by name."""
    return min((t for t in types if shape is None or fits(t, shape)),
               key=lambda t: (t.price_per_hour, t.vcpus, t.name))


def slots_wanted(waiting: int, params: Params) -> int:
    return math.ceil(waiting / params.tasks_per_slot)


def live(snap: Snapshot) -> list[Node]:
    return [n for n in snap.nodes if n.state is not NodeState.RELEASING]


def past_lease(node: Node, params: Params) -> bool:
    return params.max_lifetime_s > 0 and node.age_s >= params.max_lifetime_s


def launch_cost(dec: Decision, params: Params) -> float:
    return sum(x.count * x.itype.price_per_hour * params.min_charge_s / 3600 for x in dec.launch)


def fits_some_waiting(node: Node, waiting) -> bool:
    return any(w > 0 and fits(node.itype, s) for s, w in waiting.items())


def apply(snap: Snapshot, dec: Decision, params: Params) -> Snapshot:
    """The next round's snapshot, as the provisioner's loop would build it (no time passes)."""
    by_id = set(dec.release)
    nodes = [n if n.id not in by_id else dataclasses.replace(n, state=NodeState.RELEASING)
             for n in snap.nodes]
    for launch in dec.launch:
        nodes += [Node(f"new{len(nodes)}-{i}", launch.itype, NodeState.BOOTING) for i in range(launch.count)]
    return Snapshot(snap.waiting, tuple(nodes), snap.spent_usd + launch_cost(dec, params),
                    dec.streak, snap.backoff_s, snap.backoff_reason)


# ---------------------------------------------------------------- one decision
#
# One check per rule, all run on every drawn case by a single test: drawing a case costs far
# more than deciding it, and a failure still names its rule and shrinks to its own minimum.


def check_fleet_within_max_executors(snap, params, dec):
    """Launches never take the fleet past max; a fleet already over it only shrinks."""
    after = len(live(snap)) - len(dec.release) + dec.launched
    # a lease may free room under max in a fleet that was over it, so test the fleet after
    assert dec.launched == 0 or after <= params.max_executors, "fleet past --max-executors"


def check_backoff_holds_launches(snap, params, dec):
    """No launch while backing off, and the hold names the failure it backs off from."""
    if snap.backoff_s <= 0:
        return
    assert dec.launch == (), "launched while backing off"
    if decide(dataclasses.replace(snap, backoff_s=0.0), params).launch:
        assert any("back off" in r and snap.backoff_reason in r for r in dec.reasons), "no backoff reason"


def check_budget(snap, params, dec):
    """Launches never charge past the budget; when it cuts growth, a reason says so."""
    if params.budget_usd <= 0:
        return
    # free types may still start once the budget is spent; priced ones never pass it
    assert launch_cost(dec, params) <= max(0.0, params.budget_usd - snap.spent_usd) + EPS, "past budget"
    unbounded = decide(snap, dataclasses.replace(params, budget_usd=0.0))
    if unbounded.launched > dec.launched:
        assert any("budget" in r for r in dec.reasons), "growth cut by the budget with no reason"


def check_launches_fit_waiting_shapes(snap, params, dec):
    """Each launch is the cheapest type fitting a waiting shape, or the cheapest for the minimum."""
    live_after = len(live(snap)) - len(dec.release)  # releases in a launching round are leases
    for launch in dec.launch:
        assert launch.itype in params.types and launch.count > 0, launch
        for_min = launch.shape == Shape() and live_after < params.min_executors
        for_work = fits(launch.itype, launch.shape) and snap.waiting.get(launch.shape, 0) > 0
        assert for_work or for_min, f"launch for no waiting shape: {launch}"
        best = cheapest(params.types, launch.shape if for_work else None)
        assert launch.itype.price_per_hour == best.price_per_hour, "not the cheapest"


def check_no_more_than_needed(snap, params, dec):
    """No shape gets more nodes than it would need on an empty fleet; the minimum no more than it lacks."""
    live_after = len(live(snap)) - len(dec.release)
    by_shape: dict[Shape, int] = {}
    for launch in dec.launch:
        by_shape[launch.shape] = by_shape.get(launch.shape, 0) + launch.count
    for shape, count in by_shape.items():
        waiting = snap.waiting.get(shape, 0)
        need = 0
        if waiting > 0 and any(fits(t, shape) for t in params.types):
            per_node = capacity(cheapest(params.types, shape)) // shape.cpus
            need = math.ceil(slots_wanted(waiting, params) / per_node)
        if shape == Shape():
            need += max(0, params.min_executors - live_after)
        assert count <= need, f"{count} nodes for {shape}, {need} would cover it from nothing"


def check_launches_when_short(snap, params, dec):
    """A shape short of free slots on the fleet, or a fleet under the minimum, gets a node unless held."""
    fleet = [n for n in live(snap) if not past_lease(n, params)]
    held = (snap.backoff_s > 0 or len(fleet) >= params.max_executors
            or any("budget" in r for r in dec.reasons))
    if dec.launch or held:
        return
    for shape, waiting in snap.waiting.items():
        schedulable = waiting > 0 and any(fits(t, shape) for t in params.types)
        assert not (schedulable and free_slots(fleet, shape) < slots_wanted(waiting, params)), \
            f"{shape} is short of slots and nothing was launched"
    assert len(fleet) >= params.min_executors, "below --min-executors and nothing was launched"


def check_one_shape_launches_exactly(snap, params, dec):
    """With one schedulable shape at most and no budget, the count is exactly what the rules give."""
    shapes = [s for s, w in snap.waiting.items() if w > 0 and any(fits(t, s) for t in params.types)]
    if params.budget_usd > 0 or len(shapes) > 1:
        return
    fleet = [n for n in live(snap) if not past_lease(n, params)]
    need = 0
    for shape in shapes:
        deficit = max(0, slots_wanted(snap.waiting[shape], params) - free_slots(fleet, shape))
        need = math.ceil(deficit / (capacity(cheapest(params.types, shape)) // shape.cpus))
    short = max(0, params.min_executors - len(fleet) - need)
    room = max(0, params.max_executors - len(fleet))
    expected = 0 if snap.backoff_s > 0 else min(need + short, step(params.strategy, snap.streak), room)
    assert dec.launched == expected, f"launched {dec.launched}, the rules give {expected}"


def check_max_hold_is_explained(snap, params, dec):
    """When max_executors alone stops every launch, a reason names it."""
    if dec.launch or snap.backoff_s > 0:
        return
    if decide(snap, dataclasses.replace(params, max_executors=10_000)).launch:
        assert any("--max-executors" in r for r in dec.reasons), dec.reasons


def check_releases(snap, params, dec):
    """Released ids are unique live nodes; before its lease only a long-idle node no task fits."""
    nodes = {n.id: n for n in snap.nodes}
    assert len(set(dec.release)) == len(dec.release), "a node released twice"
    scale_in = []
    for nid in dec.release:
        node = nodes[nid]
        assert node.state is not NodeState.RELEASING, "released a releasing node again"
        if past_lease(node, params):
            continue
        assert node.state is NodeState.IDLE, f"released a {node.state.value} node before its lease"
        assert node.idle_s >= params.idle_release_s, "released before idle_release_s"
        assert not fits_some_waiting(node, snap.waiting), "released a node a waiting task fits"
        assert dec.launch == (), "scaled in while launching"
        scale_in.append(node.idle_s)
    assert scale_in == sorted(scale_in, reverse=True), "not the longest idle first"
    assert {n.id for n in live(snap) if past_lease(n, params)} <= set(dec.release), "outlived its lease"


def check_idle_nodes_go(snap, params, dec):
    """With nothing launched, every idle node no task fits goes, longest idle first, down to the minimum."""
    if dec.launch:
        return
    fleet = [n for n in live(snap) if not past_lease(n, params)]
    spare = [n for n in fleet if n.state is NodeState.IDLE and n.idle_s >= params.idle_release_s
             and not fits_some_waiting(n, snap.waiting)]
    scale_in = [n for n in spare if n.id in dec.release]
    assert len(scale_in) == min(len(spare), max(0, len(fleet) - params.min_executors)), "idle nodes kept"
    if scale_in:
        kept = [n.idle_s for n in spare if n.id not in dec.release]
        assert max(kept, default=0.0) <= min(n.idle_s for n in scale_in), "a shorter idle node went first"


def check_scale_in_keeps_min_executors(snap, params, dec):
    """Scale-in stops at min_executors; only leases may take the fleet below it."""
    nodes = {n.id: n for n in snap.nodes}
    leased = sum(past_lease(nodes[nid], params) for nid in dec.release)
    before = len(live(snap)) - leased
    after = before - (len(dec.release) - leased)
    assert after >= min(before, params.min_executors), "scaled in below --min-executors"


def check_unschedulable(snap, params, dec):
    """Unschedulable lists exactly the waiting shapes no type fits, by count and shape."""
    hopeless = [s for s, w in snap.waiting.items() if w > 0 and not any(fits(t, s) for t in params.types)]
    assert len(dec.unschedulable) == len(hopeless), "unschedulable does not match the shapes"
    for shape, line in zip(sorted(hopeless, reverse=True), dec.unschedulable):
        assert str(shape) in line and f"{snap.waiting[shape]} tasks" in line, line


def check_step_and_streak(snap, params, dec):
    """At most the strategy's step per round, min_executors included; streak counts launching rounds."""
    assert dec.launched <= step(params.strategy, snap.streak), "past the strategy's step"
    assert dec.streak == (snap.streak + 1 if dec.launch else 0), "streak"


def check_reasons(snap, params, dec):
    """One human line per launch, release and hold."""
    for line in dec.reasons + dec.unschedulable:
        assert line and "\n" not in line and line == line.strip(), repr(line)
    assert len(dec.reasons) >= len(dec.launch) + len(dec.release), "an action with no reason"


def check_launches_stay_on_their_site(snap, params, dec):
    """A cloud backend never launches for where=local, a local one never for where=cloud; and
    each launched type satisfies its shape by the dispatcher's own rule (Caps.satisfies)."""
    for launch in dec.launch:
        assert launch.shape.where in ("any", launch.itype.site), f"{launch.itype.site} launch for {launch.shape}"
        assert launch.itype.caps.satisfies(launch.shape), launch


def check_unschedulable_launch_nothing(snap, params, dec):
    """No launch is for a shape no type fits, and each such shape's line says why."""
    for shape, w in snap.waiting.items():
        if w > 0 and not any(fits(t, shape) for t in params.types):
            assert all(x.shape != shape for x in dec.launch), f"launched for unschedulable {shape}"
            line = next(u for u in dec.unschedulable if u.startswith(f"{w} tasks need {shape},"))
            assert params.types[0].caps.why_not(shape) in line, line


CHECKS = (check_fleet_within_max_executors, check_launches_stay_on_their_site, check_unschedulable_launch_nothing, check_backoff_holds_launches, check_budget,
          check_launches_fit_waiting_shapes, check_no_more_than_needed, check_launches_when_short,
          check_one_shape_launches_exactly,
          check_max_hold_is_explained, check_releases, check_idle_nodes_go,
          check_scale_in_keeps_min_executors, check_unschedulable, check_step_and_streak, check_reasons)


@settings(max_examples=500, deadline=None)
@given(cases())
def test_every_decision_keeps_the_rules(case):
    """Any snapshot, any bounds: one decision keeps every rule."""
    snap, params = case
    dec = decide(snap, params)
    for check in CHECKS:
        check(snap, params, dec)


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_demand_at_the_edge_of_the_fleet(data):
    """A queue just below or above what the fleet holds: free slots are counted exactly."""
    types = data.draw(instance_types())
    shape = data.draw(fitting_shapes(types))
    params = Params(types, strategy=Strategy.ALL_AT_ONCE, max_executors=10_000,
                    tasks_per_slot=data.draw(st.sampled_from([1.0, 2.0, 2.5])))
    snap = Snapshot({shape: 0}, data.draw(fleets(types)))
    have = int(free_slots(live(snap), shape) * params.tasks_per_slot)
    snap = dataclasses.replace(snap, waiting={shape: data.draw(st.integers(max(0, have - 3), have + 3))})
    dec = decide(snap, params)
    for check in CHECKS:
        check(snap, params, dec)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(instance_types(), st.dictionaries(SMALL_SHAPES, st.integers(1, 50), min_size=2, max_size=3),
       st.floats(0.01, 3), st.sampled_from([0.0, 0.5]))
def test_budget_is_shared_by_every_shape(types, waiting, budget_usd, spent_usd):
    """Several shapes launching at once draw on one budget."""
    types = tuple(dataclasses.replace(t, price_per_hour=max(t.price_per_hour, 0.01)) for t in types)
    waiting = {s: w for s, w in waiting.items() if any(fits(t, s) for t in types)}
    assume(len(waiting) >= 2)
    params = Params(types, strategy=Strategy.ALL_AT_ONCE, max_executors=10_000, budget_usd=budget_usd,
                    min_charge_s=3600.0)
    dec = decide(Snapshot(waiting, spent_usd=spent_usd), params)
    assert launch_cost(dec, params) <= max(0.0, budget_usd - spent_usd) + EPS


@settings(max_examples=300, deadline=None)
@given(instance_types(), st.lists(SHAPES, max_size=8))
def test_fit_is_the_dispatchers_rule(types, shapes):
    """InstanceType.fits, Caps.satisfies and this file's own copy of the rule agree."""
    for itype in types:
        for shape in shapes:
            assert itype.fits(shape) == itype.caps.satisfies(shape) == fits(itype, shape), (itype, shape)
            assert (itype.caps.why_not(shape) == "") == fits(itype, shape)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_short_satisfiable_shape_gets_a_launch(data):
    """Unbounded (all at once, no max, no budget, no backoff), every shape some type fits and
    the fleet is short of gets a node of its own this round; the others launch nothing."""
    types = data.draw(instance_types())
    snap = Snapshot(data.draw(waiting_for(types, most=100)), data.draw(fleets(types)))
    params = Params(types, strategy=Strategy.ALL_AT_ONCE, max_executors=100_000,
                    tasks_per_slot=data.draw(st.sampled_from([1.0, 2.5])))
    dec = decide(snap, params)
    launched_for = {x.shape for x in dec.launch}
    fleet = live(snap)
    for shape, w in snap.waiting.items():
        if w <= 0 or not any(fits(t, shape) for t in types):
            assert shape not in launched_for, shape
        elif free_slots(fleet, shape) < slots_wanted(w, params):
            assert shape in launched_for, f"{shape} is short and got no launch: {dec}"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_backend_never_launches_for_the_other_site(data):
    """where=local tasks never start a cloud node, where=cloud ones never a local one: they are
    reported unschedulable, whatever else they ask."""
    site = data.draw(st.sampled_from(SITES))
    other = "local" if site == "cloud" else "cloud"
    types = data.draw(instance_types(site=site))
    shapes = data.draw(st.lists(fitting_shapes(types), min_size=1, max_size=3))
    waiting = {dataclasses.replace(s, where=other, prefer=""): data.draw(st.integers(1, 50)) for s in shapes}
    dec = decide(Snapshot(waiting), Params(types, strategy=Strategy.ALL_AT_ONCE, max_executors=1000))
    assert dec.launch == ()
    assert len(dec.unschedulable) == len(waiting)
    assert all(f"where={other}" in line for line in dec.unschedulable)


# ---------------------------------------------------------------- round after round


@FLAP
@given(cases(backoff=False))
def test_no_flap_after_launching(case):
    """The round after a launch releases none of the new nodes, nor anything the queue can use.

    A long-idle node that no waiting task fits is kept while the policy launches and may go
    the round after; that undoes nothing, so only it (and leases) may be released here.
    """
    snap, params = case
    first = decide(snap, params)
    assume(first.launch)
    nxt = apply(snap, first, params)
    second = decide(nxt, params)
    nodes = {n.id: n for n in nxt.nodes}
    for nid in second.release:
        node = nodes[nid]
        if past_lease(node, params):
            continue
        assert not nid.startswith("new"), "released a node launched the round before"
        assert not fits_some_waiting(node, snap.waiting)


@FLAP
@given(cases(empty_queue=True, states=(*NodeState, NodeState.IDLE, NodeState.IDLE)))
def test_no_flap_after_releasing(case):
    """After a round that only releases, the next launches only to fill room freed at max."""
    snap, params = case
    first = decide(snap, params)
    assume(first.release and not first.launch)
    nxt = apply(snap, first, params)
    second = decide(nxt, params)
    if second.launch:
        # the released nodes fit no waiting task, so all they took from the queue was room under max
        assert any("--max-executors" in r for r in first.reasons), (first, second)
        assert second.launched <= len(first.release)
        released_types = {n.itype for n in snap.nodes if n.id in first.release}
        for x in second.launch:
            if snap.waiting.get(x.shape, 0) > 0 and fits(x.itype, x.shape):
                assert x.itype not in released_types, "started again a type just released as useless"


def coverage_params(draw_params: Params, types) -> Params:
    """The drawn strategy, minimum and tasks per slot, with nothing else to hold growth."""
    return Params(types=types, strategy=draw_params.strategy, min_executors=draw_params.min_executors,
                  max_executors=10_000, tasks_per_slot=draw_params.tasks_per_slot,
                  idle_release_s=60.0, max_lifetime_s=0.0, budget_usd=0.0)


def nodes_needed(waiting, params: Params) -> int:
    """Nodes of the cheapest fitting type that cover each shape on its own, or the minimum."""
    total = 0
    for shape, w in waiting.items():
        total += math.ceil(slots_wanted(w, params) / (capacity(cheapest(params.types, shape)) // shape.cpus))
    return max(total, params.min_executors)


def assert_covered(waiting, nodes, params: Params) -> None:
    """Every group of shapes fits in the capacity of the nodes that fit any of them (Hall's condition)."""
    assert len(nodes) >= params.min_executors
    shapes = [s for s, w in waiting.items() if w > 0]
    for k in range(1, len(shapes) + 1):
        for group in itertools.combinations(shapes, k):
            want = sum(slots_wanted(waiting[s], params) * s.cpus for s in group)
            have = sum(capacity(n.itype) for n in nodes if any(fits(n.itype, s) for s in group))
            assert have >= want, f"{group}: {want} cpus wanted, {have} on the nodes that fit"
    for s in shapes:  # and each alone, in whole slots
        assert free_slots(nodes, s) >= slots_wanted(waiting[s], params), s


@st.composite
def coverage_cases(draw) -> tuple[dict[Shape, int], Params]:
    """A constant queue of schedulable shapes that at most 64 nodes cover."""
    types = draw(instance_types())
    drawn = draw(waiting_for(types, most=100, min_size=1))
    waiting = {s: w for s, w in drawn.items() if any(fits(t, s) for t in types)}
    params = coverage_params(draw(params_for(types)), types)
    assume(nodes_needed(waiting, params) <= 64)
    return waiting, params


def simulate(waiting, params: Params, rounds: int) -> tuple[Snapshot, list[int]]:
    """Decide `rounds` times from an empty fleet, each launch becoming a booting node."""
    snap = Snapshot(waiting)
    launched = []
    for _ in range(rounds):
        dec = decide(snap, params)
        launched.append(dec.launched)
        snap = apply(snap, dec, params)
    return snap, launched


@ROUNDS
@given(coverage_cases())
def test_eventual_coverage(case):
    """A constant queue is covered within one round per needed node; then nothing more starts."""
    waiting, params = case
    need = nodes_needed(waiting, params)
    snap, launched = simulate(waiting, params, need + 3)
    assert_covered(waiting, live(snap), params)
    assert sum(launched) <= need, launched
    assert launched[need:] == [0, 0, 0], launched
    if params.strategy is Strategy.ONE_AT_A_TIME:
        k = launched.index(0)
        assert launched == [1] * k + [0] * (len(launched) - k), launched


@ROUNDS
@given(coverage_cases(), st.booleans())
def test_steady_state_decides_nothing(case, registered):
    """A fleet that covers the queue, booting or all busy, is left alone round after round."""
    waiting, params = case
    snap, _ = simulate(waiting, params, nodes_needed(waiting, params) + 1)
    if registered:
        # registered and busy (so no idle clock runs), with the queue's slots still free on them
        snap = Snapshot(waiting, tuple(Node(n.id, n.itype, NodeState.BUSY) for n in snap.nodes))
    for _ in range(2):
        dec = decide(snap, params)
        assert dec.launch == () and dec.release == (), dec
        snap = apply(snap, dec, params)
