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
    assert dec.reasons == ("launch 2 c4: 3 tasks need cpus=4; 3 wanted, additive allows 2 this round",)


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
    assert dec.unschedulable == ("3 tasks need cpus=64 memory=1000 arch=arm64, which none of the "
                                 "instance types (c2, g4) has (c2: needs 64 cpus, has 2; "
                                 "g4: needs 64 cpus, has 4)",)


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
    assert len(dec.unschedulable) == 1 and "cpus=64" in dec.unschedulable[0]


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


# ---------------------------------------------------------------- requirements and instance types
#
# Types as the EC2 backend builds them: vCPUs, MiB and arch from describe_instance_types,
# prices from provisioner/prices.py (the built-in table, or --prices over it).

EC2_SIZES = {  # name: (vCPUs, MiB, arch), as EC2 describes them
    "c5.large": (2, 4096, "x86_64"), "c5.2xlarge": (8, 16384, "x86_64"), "c5.4xlarge": (16, 32768, "x86_64"),
    "r5.large": (2, 16384, "x86_64"), "c6g.large": (2, 4096, "arm64"), "c6g.2xlarge": (8, 16384, "arm64"),
    "t4g.large": (2, 8192, "arm64"), "c6i.large": (2, 4096, "x86_64"),
}


def ec2_types(*names: str, table: dict | None = None, tags: frozenset = frozenset()) -> tuple[InstanceType, ...]:
    from falconet.provisioner import prices

    table = prices.ON_DEMAND if table is None else {**prices.ON_DEMAND, **table}
    return tuple(InstanceType(n, EC2_SIZES[n][0], EC2_SIZES[n][1], EC2_SIZES[n][2],
                              prices.price(table, n, EC2_SIZES[n][0]), tags=tags) for n in names)


def chosen(types, shape: Shape, tasks: int = 1) -> list[tuple[str, int]]:
    dec = decide(Snapshot({shape: tasks}), Params(types, strategy=ALL))
    return [(x.itype.name, x.count) for x in dec.launch]


C5 = ("c5.large", "c5.2xlarge", "c5.4xlarge")


@pytest.mark.parametrize(("shape", "tasks", "expected"), [
    (Shape(cpus=2), 3, [("c5.large", 3)]),  # a 2-vCPU type for 2-cpu tasks
    (Shape(cpus=8), 2, [("c5.2xlarge", 2)]),  # an 8-vCPU type for 8-cpu tasks
    (Shape(cpus=12), 1, [("c5.4xlarge", 1)]),
    (Shape(cpus=2, memory_mb=8000), 1, [("c5.2xlarge", 1)]),  # c5.large has 4 GiB
    (Shape(cpus=1, memory_mb=40000), 1, []),  # no C5 has 40 GB
])
def test_cheapest_ec2_type_that_satisfies_the_needs(shape, tasks, expected):
    assert chosen(ec2_types(*C5), shape, tasks) == expected


def test_a_price_override_changes_the_choice():
    assert chosen(ec2_types(*C5), Shape(cpus=2)) == [("c5.large", 1)]
    cheap_big = ec2_types(*C5, table={"c5.2xlarge": 0.05})  # --prices: c5.2xlarge = 0.05
    assert chosen(cheap_big, Shape(cpus=2)) == [("c5.2xlarge", 1)]
    assert chosen(cheap_big, Shape(cpus=2), tasks=8) == [("c5.2xlarge", 2)]  # four 2-cpu tasks a node
    assert chosen(cheap_big, Shape(cpus=16)) == [("c5.4xlarge", 1)]  # still the only one that fits


def test_ties_go_to_the_smaller_type_then_the_name():
    same = ec2_types("c5.2xlarge", "c5.large", "c6i.large", table={"c5.2xlarge": 0.085})
    assert [(x.price_per_hour, x.name) for x in same][1:] == [(0.085, "c5.large"), (0.085, "c6i.large")]
    assert chosen(same, Shape(cpus=1)) == [("c5.large", 1)]  # fewer vCPUs, then c5 < c6i by name
    assert chosen(tuple(reversed(same)), Shape(cpus=1)) == [("c5.large", 1)]  # order given does not matter


@pytest.mark.parametrize(("shape", "expected"), [
    (Shape(cpus=2, arch="arm64"), [("t4g.large", 1)]),  # $0.0672 against c6g.large's $0.068
    (Shape(cpus=2, arch="arm64", memory_mb=9000), [("c6g.2xlarge", 1)]),  # the only arm type with 16 GiB
    (Shape(cpus=4, arch="arm64"), [("c6g.2xlarge", 1)]),
    (Shape(cpus=2, arch="x86_64"), [("c5.large", 1)]),
    (Shape(cpus=2), [("t4g.large", 1)]),  # no arch asked: the cheapest of all
    (Shape(cpus=2, memory_mb=12000), [("r5.large", 1)]),
    (Shape(cpus=2, memory_mb=12000, arch="arm64"), [("c6g.2xlarge", 1)]),
])
def test_arch_and_memory_are_honoured(shape, expected):
    types = ec2_types("c5.large", "c5.2xlarge", "r5.large", "c6g.large", "c6g.2xlarge", "t4g.large")
    assert chosen(types, shape) == expected


def test_instance_type_caps_agree_with_the_shared_rule():
    from falconet.needs import Caps

    gpu = InstanceType("g", 4, 8192, "x86_64", 0.5, tags=frozenset({"gpu", "zone=a"}))
    assert gpu.caps == Caps(4, 8192, "x86_64", frozenset({"gpu", "zone=a", "site=cloud"}), "cloud")
    local = InstanceType("local", 8, 8192, "x86_64", site="local")
    assert local.caps.site == "local" and "site=local" in local.caps.tags
    assert InstanceType("one", 8, 8192, "x86_64", slots=1).caps.cpus == 1  # slots bound it, as they do nodes
    assert gpu.launchable().to_map() == {"type": "g", "cpus": 4, "memory_mb": 8192, "arch": "x86_64",
                                         "tags": ["gpu", "site=cloud", "zone=a"], "site": "cloud"}
    assert gpu.launchable().caps == gpu.caps  # the dispatcher judges by what the policy does


@pytest.mark.parametrize(("shape", "cloud", "local"), [
    (Shape(where="local"), False, True),
    (Shape(where="cloud"), True, False),
    (Shape(prefer="local"), True, True),  # waiting, so the local executors are busy: bursting is allowed
    (Shape(tags=("site=cloud",)), True, False),
    (Shape(tags=("gpu",)), True, False),
    (Shape(tags=("gpu", "site=local")), False, False),
])
def test_where_and_tags_choose_the_backend(shape, cloud, local):
    cloud_t = ec2_types("c5.large", tags=frozenset({"gpu"}))
    local_t = (InstanceType("local", 2, 4096, "x86_64", site="local"),)
    for types, fits in ((cloud_t, cloud), (local_t, local)):
        dec = decide(Snapshot({shape: 2}), Params(types, strategy=ALL))
        assert bool(dec.launch) == fits, (types[0].site, dec)
        assert len(dec.unschedulable) == (0 if fits else 1)


def test_where_local_on_ec2_launches_nothing_and_says_why():
    dec = decide(Snapshot({Shape(where="local"): 3, Shape(cpus=2): 1}), Params(ec2_types(*C5), strategy=ALL))
    assert [(x.itype.name, x.count) for x in dec.launch] == [("c5.large", 1)]
    assert dec.unschedulable == ("3 tasks need cpus=1 where=local, which none of the instance types "
                                 "(c5.large, c5.2xlarge, c5.4xlarge) has (c5.large: needs where=local, "
                                 "is cloud; c5.2xlarge: needs where=local, is cloud)",)


def test_a_tag_no_type_has_is_unschedulable_and_a_tag_one_has_picks_it():
    plain = InstanceType("c2", 2, 4096, "x86_64", 0.05)
    gpu = InstanceType("g2", 2, 4096, "x86_64", 0.90, tags=frozenset({"gpu"}))
    dec = decide(Snapshot({Shape(tags=("gpu",)): 1, Shape(tags=("fpga",)): 2}), Params((plain, gpu), strategy=ALL))
    assert [(x.itype.name, x.count) for x in dec.launch] == [("g2", 1)]
    assert len(dec.unschedulable) == 1 and "2 tasks need cpus=1 tag=fpga" in dec.unschedulable[0]
    assert "lacks tag fpga" in dec.unschedulable[0]


def test_idle_node_of_a_type_no_waiting_task_fits_goes():
    # a cloud node is no use to tasks that must run locally, so it is not kept for them
    nodes = (node("a", itype=ec2_types("c5.large")[0], idle_s=900.0),)
    dec = decide(Snapshot({Shape(where="local"): 5}, nodes), Params(ec2_types("c5.large")))
    assert dec.release == ("a",) and dec.launch == ()


@pytest.mark.parametrize(("busy", "cpus_used", "launched"), [
    (1, None, 0),  # one task of one cpu: 3 free of 4, enough for a 2-cpu task
    (1, 3, 1),  # one task of 3 cpus: 1 free, a 2-cpu task needs a new node
    (2, 2, 0),
])
def test_free_capacity_counts_cpus_used_where_reported(busy, cpus_used, launched):
    nodes = (node("a", NodeState.BUSY, C4, busy=busy, cpus_used=cpus_used),)
    assert decide(Snapshot({Shape(cpus=2): 1}, nodes), Params((C4,), strategy=ALL)).launched == launched


# ---------------------------------------------------------------- the provisioner's side


def test_waiting_shapes_from_status():
    from falconet.provisioner.service import waiting_shapes
    from falconet.reports import Status, Waiting

    def status(*waiting: Waiting) -> Status:
        return Status("d", 0, 1.0, "in-memory", 9, {}, 9, 0.0, 0, 0, 0, 0, 0, 1, 0, waiting=waiting)

    assert waiting_shapes(status()) == {}
    big = Shape(cpus=8, memory_mb=1000, arch="arm64", tags=("gpu", "site=local"))
    assert waiting_shapes(status(Waiting(big, 3, 2.0), Waiting(Shape(), 6, 0.5), Waiting(big, 1, 0.1),
                                 Waiting(Shape(cpus=2), 0, 0.0))) == {big: 4, Shape(): 6}


@pytest.mark.parametrize(("words", "expected"), [
    ((), {}), (("gpu",), {"gpu": ""}), (("gpu", "site=cloud"), {"gpu": "", "site": "cloud"}),
    (("zone=a=b",), {"zone": "a=b"}), (("gpu", "gpu"), {"gpu": ""}),
])
def test_executor_tags_become_the_user_data_map_and_back(words, expected):
    from falconet.needs import tags_from_map
    from falconet.provisioner.backend import executor_tag_map

    assert executor_tag_map(words) == expected
    assert sorted(tags_from_map(expected)) == sorted(set(words))


@pytest.mark.parametrize(("words", "message"), [
    (("",), "non-empty word"), (("two words",), "without spaces"), (("=x",), "KEY=VALUE"),
    (("zone=a", "zone=b"), "given twice"),
])
def test_bad_executor_tags_are_refused(words, message):
    from falconet.errors import FalconetError
    from falconet.provisioner.backend import executor_tag_map

    with pytest.raises(FalconetError, match=message):
        executor_tag_map(words)


def test_local_backend_passes_tags_to_its_executors_and_its_type():
    from falconet.provisioner.processes import LocalBackend

    backend = LocalBackend("tcp://127.0.0.1:1", slots=2, log_dir="/nonexistent", tags=("gpu", "zone=a"))
    (itype,) = backend.types()
    assert itype.site == "local" and itype.caps.tags == {"gpu", "zone=a", "site=local"}
    assert backend.executor_args == ("--tag", "gpu", "--tag", "zone=a")
