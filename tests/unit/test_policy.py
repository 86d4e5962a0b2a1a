"""Table tests of the scaling policy: launch sequences per strategy, type choice, shrink, holds."""

from __future__ import annotations

import pytest

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

ONE, ADD, EXP, ALL = Strategy.ONE_AT_A_TIME, Strategy.ADDITIVE, Strategy.EXPONENTIAL, Strategy.ALL_AT_ONCE
SLOT = InstanceType("slot", vcpus=1, memory_mb=2048, arch="x86_64", price_per_hour=0.02)
C2 = InstanceType("c2", vcpus=2, memory_mb=4096, arch="x86_64", price_per_hour=0.05)
C4 = InstanceType("c4", vcpus=4, memory_mb=8192, arch="x86_64", price_per_hour=0.20)
C8 = InstanceType("c8", vcpus=8, memory_mb=16384, arch="x86_64", price_per_hour=0.30)
G4 = InstanceType("g4", vcpus=4, memory_mb=8192, arch="arm64", price_per_hour=0.25)
R4 = InstanceType("r4", vcpus=4, memory_mb=32768, arch="x86_64", price_per_hour=0.40)
LOOSE = dict(max_executors=1000, idle_release_s=60.0)


def node(nid: str, state: NodeState = NodeState.IDLE, itype: InstanceType = SLOT, **kw) -> Node:
    return Node(nid, itype, state, **kw)


def rounds(params: Params, waiting: dict[Shape, int]) -> tuple[list[int], Decision]:
    """Launched per round until a round launches nothing (each launch a booting node); and that round."""
    snap = Snapshot(waiting)
    launched: list[int] = []
    while len(launched) < 500:
        dec = decide(snap, params)
        if not dec.launch:
            return launched, dec
        launched.append(dec.launched)
        new = tuple(node(f"n{len(snap.nodes) + i}", NodeState.BOOTING, x.itype)
                    for x in dec.launch for i in range(x.count))
        snap = Snapshot(waiting, snap.nodes + new, streak=dec.streak)
    raise AssertionError(f"still launching after 500 rounds: {launched[-5:]}")


# ---------------------------------------------------------------- growth


@pytest.mark.parametrize(("strategy", "n", "expected"), [
    (ONE, 1, [1]), (ONE, 5, [1] * 5), (ONE, 32, [1] * 32), (ONE, 100, [1] * 100),
    (ADD, 1, [1]), (ADD, 5, [1, 2, 2]), (ADD, 32, [1, 2, 3, 4, 5, 6, 7, 4]),
    (ADD, 100, [*range(1, 14), 9]),
    (EXP, 1, [1]), (EXP, 5, [1, 2, 2]), (EXP, 32, [1, 2, 4, 8, 16, 1]), (EXP, 100, [1, 2, 4, 8, 16, 32, 37]),
    (ALL, 1, [1]), (ALL, 5, [5]), (ALL, 32, [32]), (ALL, 100, [100]),
])
def test_launch_sequence(strategy, n, expected):
    launched, last = rounds(Params((SLOT,), strategy=strategy, **LOOSE), {Shape(): n})
    assert launched == expected
    assert last.reasons == () and last.streak == 0


@pytest.mark.parametrize(("strategy", "expected"), [
    (ONE, [1] * 10), (ADD, [1, 2, 3, 4]), (EXP, [1, 2, 4, 3]), (ALL, [10]),
])
def test_growth_stops_at_max_executors(strategy, expected):
    launched, last = rounds(Params((SLOT,), strategy=strategy, max_executors=10), {Shape(): 32})
    assert launched == expected
    assert len(last.reasons) == 1 and last.reasons[0].startswith("hold:")
    assert "--max-executors 10" in last.reasons[0]


@pytest.mark.parametrize(("tasks_per_slot", "slots"), [(1.0, 100), (2.5, 40), (10.0, 10), (30.0, 4)])
def test_tasks_per_slot_divides_the_demand(tasks_per_slot, slots):
    params = Params((SLOT,), strategy=ALL, tasks_per_slot=tasks_per_slot, **LOOSE)
    assert rounds(params, {Shape(): 100})[0] == [slots]


def test_launch_reason_names_count_type_demand_and_step():
    dec = decide(Snapshot({Shape(cpus=4): 3}, streak=1), Params((C2, C4), strategy=ADD))
    assert dec.reasons == ("launch 2 c4: 3 tasks need 4 cpu; 3 wanted, additive allows 2 this round",)


# ---------------------------------------------------------------- which type


@pytest.mark.parametrize(("shape", "tasks", "itype", "count"), [
    (Shape(cpus=4), 3, C4, 3),  # c2 is cheaper but too small; c8 fits but costs more
    (Shape(cpus=2), 4, C2, 4),
    (Shape(cpus=1), 4, C2, 2),  # two 1-cpu tasks to a c2
    (Shape(cpus=3), 5, C4, 5),  # a c4 holds one 3-cpu task, not one and a third
    (Shape(cpus=1, memory_mb=16384), 1, C8, 1),  # only c8 and r4 have the memory
    (Shape(cpus=1, memory_mb=20000), 1, R4, 1),
    (Shape(cpus=2, arch="arm64"), 4, G4, 2),  # the only arm64 type, though x86 ones are cheaper
])
def test_cheapest_type_that_fits(shape, tasks, itype, count):
    params = Params((C8, C4, C2, G4, R4), strategy=ALL)
    dec = decide(Snapshot({shape: tasks}), params)
    assert [(x.itype.name, x.count, x.shape) for x in dec.launch] == [(itype.name, count, shape)]


def test_free_slots_on_fitting_nodes_count_booting_ones_too():
    nodes = (node("a", NodeState.BOOTING, C4), node("b", NodeState.BUSY, C4, busy=3),
             node("c", NodeState.IDLE, G4))  # g4 is arm64: no use to x86 tasks
    dec = decide(Snapshot({Shape(cpus=1, arch="x86_64"): 6}, nodes), Params((C2, C4, G4), strategy=ALL))
    assert [(x.itype.name, x.count) for x in dec.launch] == [("c2", 1)]  # 4 + 1 free, one more wanted


def test_unschedulable_shape_is_named_and_launches_nothing():
    shape = Shape(cpus=64, memory_mb=1000, arch="arm64")
    dec = decide(Snapshot({shape: 3, Shape(cpus=99): 0}), Params((C2, G4), strategy=ALL))
    assert dec.launch == ()
    assert dec.unschedulable == ("3 tasks need 64 cpu/1000 MB/arm64, which none of the instance "
                                 "types (c2, g4) has",)


def test_slots_not_vcpus_bound_what_a_type_holds():
    one_slot = InstanceType("gpu", vcpus=8, memory_mb=65536, arch="x86_64", price_per_hour=0.01, slots=1)
    dec = decide(Snapshot({Shape(): 3, Shape(cpus=2): 1}), Params((one_slot, C8), strategy=ALL))
    assert sorted((x.itype.name, x.count) for x in dec.launch) == [("c8", 1), ("gpu", 3)]


def test_two_shapes_do_not_share_the_same_free_slots():
    nodes = (node("a", NodeState.IDLE, C4),)
    dec = decide(Snapshot({Shape(cpus=2): 2, Shape(cpus=1): 1}, nodes), Params((C2, C4), strategy=ALL))
    assert [(x.itype.name, x.count, x.shape) for x in dec.launch] == [("c2", 1, Shape(cpus=1))]


def test_an_overcommitted_node_has_no_free_slots_not_fewer_than_none():
    nodes = (node("a", NodeState.BUSY, C2, busy=5),)
    dec = decide(Snapshot({Shape(): 1}, nodes), Params((SLOT,), strategy=ALL))
    assert dec.launched == 1


def test_unschedulable_shape_does_not_block_the_others():
    dec = decide(Snapshot({Shape(cpus=64): 3, Shape(): 2}), Params((C2,), strategy=ALL))
    assert [(x.itype, x.count, x.shape) for x in dec.launch] == [(C2, 1, Shape())]
    assert len(dec.unschedulable) == 1 and "64 cpu" in dec.unschedulable[0]


# ---------------------------------------------------------------- shrink


@pytest.mark.parametrize(("idle_s", "released"), [(0.0, False), (59.9, False), (60.0, True), (900.0, True)])
def test_idle_release_after_idle_release_s_only(idle_s, released):
    dec = decide(Snapshot({}, (node("a", idle_s=idle_s),)), Params((SLOT,), idle_release_s=60.0))
    assert dec.release == (("a",) if released else ())
    if released:
        assert dec.reasons == (f"release a: idle {idle_s:.0f}s (limit 60s)",)


@pytest.mark.parametrize(("min_executors", "released", "launched"), [
    (0, ("b", "c", "a"), 0), (1, ("b", "c"), 0), (2, ("b",), 0), (3, (), 0), (5, (), 1),
])
def test_longest_idle_go_first_and_min_executors_stay(min_executors, released, launched):
    nodes = (node("a", idle_s=100.0), node("b", idle_s=300.0), node("c", idle_s=200.0))
    dec = decide(Snapshot({}, nodes), Params((SLOT,), min_executors=min_executors, idle_release_s=60.0))
    assert dec.release == released
    assert dec.launched == launched  # additive: one node this round toward a minimum of 5


def test_releasing_nodes_do_not_count_toward_min_executors():
    nodes = (node("a", idle_s=500.0), node("b", NodeState.RELEASING, idle_s=900.0))
    dec = decide(Snapshot({}, nodes), Params((SLOT,), min_executors=1))
    assert dec.release == ()


def test_idle_node_a_waiting_task_fits_is_kept():
    nodes = (node("a", itype=C4, idle_s=900.0), node("b", itype=C2, idle_s=900.0))
    dec = decide(Snapshot({Shape(cpus=4): 1}, nodes), Params((C2, C4)))
    assert dec.launch == ()
    assert dec.release == ("b",)  # the c2 is no use to a 4-cpu task; the c4 will run it


def test_no_scale_in_while_launching():
    nodes = (node("a", itype=C2, idle_s=900.0),)
    dec = decide(Snapshot({Shape(cpus=4): 1}, nodes), Params((C2, C4)))
    assert [x.itype for x in dec.launch] == [C4]
    assert dec.release == ()


@pytest.mark.parametrize("state", [NodeState.BUSY, NodeState.BOOTING])
def test_busy_and_booting_nodes_are_not_scaled_in(state):
    nodes = (node("a", state, busy=1 if state is NodeState.BUSY else 0, idle_s=9999.0, age_s=9999.0),)
    dec = decide(Snapshot({}, nodes), Params((SLOT,), idle_release_s=0.0))
    assert dec.release == ()


@pytest.mark.parametrize(("age_s", "released"), [(3599.0, False), (3600.0, True), (7200.0, True)])
def test_lease_releases_a_busy_node(age_s, released):
    nodes = (node("a", NodeState.BUSY, busy=1, age_s=age_s),)
    dec = decide(Snapshot({}, nodes), Params((SLOT,), max_lifetime_s=3600.0))
    assert dec.release == (("a",) if released else ())
    if released:
        assert dec.reasons == (f"release a: lease of 3600s is over (age {age_s:.0f}s); it drains first",)


def test_lease_release_below_min_executors_is_replaced():
    nodes = (node("a", NodeState.BUSY, busy=1, age_s=4000.0), node("b", NodeState.BUSY, busy=1))
    dec = decide(Snapshot({}, nodes), Params((SLOT,), strategy=ALL, min_executors=2, max_lifetime_s=3600.0))
    assert dec.release == ("a",)
    assert [(x.itype, x.count, x.shape) for x in dec.launch] == [(SLOT, 1, Shape())]


# ---------------------------------------------------------------- holds and the minimum


def test_budget_stops_growth_with_a_budget_reason():
    # 0.6/h billed an hour up front: $1.50 of budget left buys two
    params = Params((InstanceType("m", 1, 2048, "x86_64", price_per_hour=0.6),), strategy=ALL,
                    budget_usd=2.0, min_charge_s=3600.0)
    dec = decide(Snapshot({Shape(): 10}, spent_usd=0.5), params)
    assert dec.launched == 2
    assert any(r.startswith("hold:") and "budget of $2.00" in r for r in dec.reasons)
    spent = decide(Snapshot({Shape(): 10}, spent_usd=1.9), params)
    assert spent.launch == ()
    assert spent.reasons == (next(r for r in dec.reasons if "budget" in r),)


def test_budget_is_shared_by_every_shape():
    # $0.25 a node up front, $1.00 left: four nodes in all, not four for each shape
    params = Params((G4,), strategy=ALL, budget_usd=1.5, min_charge_s=3600.0)
    dec = decide(Snapshot({Shape(cpus=4): 3, Shape(cpus=1): 8}, spent_usd=0.5), params)
    assert [(x.count, x.shape.cpus) for x in dec.launch] == [(3, 4), (1, 1)]


def test_budget_buys_every_node_it_can_pay_for():
    params = Params((C2,), strategy=ALL, budget_usd=1.0, min_charge_s=3600.0)
    assert decide(Snapshot({Shape(cpus=2): 5}, spent_usd=0.9), params).launched == 2


def test_budget_with_no_minimum_charge():
    params = Params((C2,), budget_usd=1.0, min_charge_s=0.0)
    assert decide(Snapshot({Shape(): 5}, spent_usd=2.0), params).launched == 0  # already past it
    assert decide(Snapshot({Shape(): 5}, spent_usd=0.5), params).launched > 0


def test_free_types_ignore_the_budget():
    params = Params((InstanceType("free", 1, 2048, "x86_64"),), strategy=ALL, budget_usd=1.0)
    assert decide(Snapshot({Shape(): 3}, spent_usd=5.0), params).launched == 3


def test_backoff_holds_launches_with_the_failure_named():
    snap = Snapshot({Shape(): 5}, backoff_s=29.6, backoff_reason="InsufficientInstanceCapacity in us-east-1a")
    dec = decide(snap, Params((SLOT,), strategy=ALL))
    assert dec.launch == ()
    assert len(dec.reasons) == 1 and dec.reasons[0].startswith("hold:") and "back off" in dec.reasons[0]
    assert dec.reasons[0].endswith("InsufficientInstanceCapacity in us-east-1a")
    assert dec.streak == 0


def test_backoff_still_lets_idle_nodes_go():
    snap = Snapshot({}, (node("a", idle_s=100.0),), backoff_s=30.0, backoff_reason="throttled")
    assert decide(snap, Params((SLOT,))).release == ("a",)


@pytest.mark.parametrize(("strategy", "expected"), [(ALL, [3]), (ADD, [1, 2]), (ONE, [1, 1, 1])])
def test_min_executors_launched_with_no_work(strategy, expected):
    params = Params((C4, C2), strategy=strategy, min_executors=3)
    launched, _ = rounds(params, {})
    assert launched == expected
    first = decide(Snapshot({}), params)
    assert [(x.itype, x.shape) for x in first.launch] == [(C2, Shape())]  # the cheapest type
    assert "--min-executors is 3" in first.reasons[0]


def test_min_executors_counts_nodes_launched_for_work():
    dec = decide(Snapshot({Shape(): 2}), Params((SLOT,), strategy=ALL, min_executors=3))
    assert sorted((x.count, x.shape) for x in dec.launch) == [(1, Shape()), (2, Shape())]


# ---------------------------------------------------------------- reasons


def test_reasons_are_one_human_line_each():
    nodes = (node("old", NodeState.BUSY, busy=1, age_s=5000.0), node("idle", itype=C8, idle_s=400.0))
    snap = Snapshot({Shape(cpus=2): 40, Shape(cpus=99): 1}, nodes, spent_usd=0.875, streak=2)
    # c2 billed an hour up front ($0.05): the $0.125 left buys two of the three there is room for
    params = Params((C2, C8), strategy=EXP, max_executors=4, budget_usd=1.0, max_lifetime_s=3600.0,
                    min_charge_s=3600.0)
    dec = decide(snap, params)
    lines = dec.reasons + dec.unschedulable
    assert len(lines) == 4  # lease, budget hold, launch, unschedulable
    assert dec.launched == 2
    for line in lines:
        assert line and "\n" not in line and line == line.strip() and len(line) < 160, line
