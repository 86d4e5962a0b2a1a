"""The dispatcher takes the usual batches a batch at a time (C-level passes over columns):
Submits (Core._plain_and_valid), dispatch (Core._pop_fresh) and Reports (Core._accept_batch).
Whatever a peer sends, the outcome equals judging each record on its own."""

from __future__ import annotations

import collections
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import needs as nd
from falconet import protocol as p
from falconet.dispatcher.core import Config, Core
from falconet.errors import IllegalTransition

WALL0 = 1_700_000_000.0
DONE, FAILED, CANCELLED = int(p.TaskState.DONE), int(p.TaskState.FAILED), int(p.TaskState.CANCELLED)
MAX_OUTPUT = 8


def _core(batched: bool) -> Core:
    """A core with journal and events on (what they record is compared too)."""
    core = Core(Config(max_output_bytes=MAX_OUTPUT, max_task_bytes=4), wall=lambda: WALL0, journal_id="j1")
    core.dispatcher_id = "d1"
    core.events = []
    if not batched:
        core._accept_batch = lambda ex, results: 0
        core._plain_and_valid = lambda specs, max_body: False
        core._pop_fresh = lambda ts, ex, cpus: core._pop_each(collections.deque(ts), ex, len(ts), cpus)
    return core


def _sent(msg, form: str):
    """msg as a core receives it: as built (record batches as lists of records), or as the
    server decodes it (record batches kept as columns)."""
    return p.decode(p.encode(msg), columns=True) if form == "columns" else msg


FORMS = ["records", "columns"]


def _written(journal: list) -> list[bytes]:
    """The journal records' bytes, packed as the journal packs them."""
    return [msgpack.packb([int(kind), *fields], use_bin_type=True) for kind, fields in journal]


def _setup(core: Core, tasks_per_client: tuple[int, int], form: str = "records") -> list[p.Assignment]:
    """Two clients' tasks (c2's need 2 cpus and 100 MB), all dispatched to one executor;
    returns its assignments."""
    for peer, n, needs in zip((b"c1", b"c2"), tasks_per_client, (b"", nd.encode(nd.make(cpus=2, memory=100)))):
        core.on_client(peer, p.Hello(p.PROTOCOL_VERSION, peer.decode(), peer.decode()), 0.0)
        core.on_client(peer, _sent(p.Submit(1, [p.TaskSpec(s, 1, b"b", 0, 0.0, needs) for s in range(n)]), form), 0.0)
    core.on_executor(b"e", p.Register(p.PROTOCOL_VERSION, "e", "h", [], 64, 4096, "linux", 64, 1, {}, []), 0.0)
    core.on_executor(b"e", p.Report(64, [], [], {}), 0.0)
    core.dispatch(0.0)
    out = core.take_output()
    return [a for _, msg in out.to_executors if type(msg) is p.Tasks for a in msg.tasks]


def _result(a: p.Assignment, how: str, i: int) -> p.ExecResult:
    tid, attempt, state, output, files = a.tid, a.attempt, DONE, b"out", b""
    if how == "stale":
        attempt += 1
    elif how == "unknown":
        tid += 10_000
    elif how == "bad state":
        state = [0, 1, 2, 99, -1][i % 5]
    elif how == "failed":
        state = [FAILED, CANCELLED][i % 2]
    elif how == "big":
        output = b"x" * (MAX_OUTPUT + 1)
    elif how == "files":
        files = b"f"
    return p.ExecResult(tid, attempt, state, output, "why" if state != DONE else "", 1.0, 2.0, files)


HOWS = ["done", "done", "done", "stale", "unknown", "bad state", "failed", "big", "files"]


@pytest.mark.parametrize("form", FORMS)
@settings(max_examples=150, deadline=None)
@given(split=st.tuples(st.integers(0, 20), st.integers(0, 20)), data=st.data())
def test_batched_results_equal_results_judged_one_by_one(form, split, data):
    cores = [_core(True), _core(False)]
    assigned = [_setup(core, split, how) for core, how in zip(cores, (form, "records"))]
    assert assigned[0] == assigned[1]
    if not assigned[0]:
        return
    picks = data.draw(st.lists(st.tuples(st.sampled_from(assigned[0]), st.sampled_from(HOWS)), max_size=40))
    started = data.draw(st.lists(st.sampled_from(assigned[0]), max_size=5))
    results = [_result(a, how, i) for i, (a, how) in enumerate(picks)]
    outs = []
    for core, how in zip(cores, (form, "records")):
        report = p.Report(len(results), [(a.tid, a.attempt) for a in started], results, {})
        core.on_executor(b"e", _sent(report, how), 1.0)
        ex = core.executors[b"e"]
        out = core.take_output()
        outs.append((out.to_clients, out.delivered_files, _written(out.journal), out.events, core.counts,
                     core.stale_results,
                     sorted(ex.tasks),
                     ex.cpus_used, ex.memory_used, ex.completed, ex.credit,
                     {peer: (c.counts, sorted(c.unacked.items())) for peer, c in core.clients.items()}))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("split", [(5, 0), (0, 5)], ids=["plain", "needs"])
def test_the_usual_report_is_accepted_as_a_batch(split):
    core = _core(True)
    assigned = _setup(core, split)
    ex = core.executors[b"e"]
    assert len(assigned) == 5 and ex.cpus_used == (5 if split[0] else 10)
    results = [p.ExecResult(a.tid, a.attempt, DONE, b"ok", "", 1.0, 2.0) for a in assigned]
    assert core._accept_batch(ex, results) == 5
    assert ex.tasks == {} and ex.cpus_used == 0 and ex.memory_used == 0
    assert [r.seq for r in core.clients[b"c1" if split[0] else b"c2"].results] == [0, 1, 2, 3, 4]


ALL_STATES = [int(s) for s in p.TaskState]


@settings(max_examples=100, deadline=None)
@given(forced=st.lists(st.sampled_from(ALL_STATES), min_size=1, max_size=5),
       ends=st.lists(st.sampled_from([DONE, FAILED, CANCELLED]), min_size=5, max_size=5))
def test_batched_results_check_every_move_as_one_by_one(forced, ends):
    """Held tasks put (white-box) in any state, finishing any way: the batch is taken only
    when every move is legal, else the task that cannot move raises as one by one would."""
    outs = []
    for core, form in ((_core(True), "columns"), (_core(False), "records")):
        assigned = _setup(core, (5, 0), form)
        ex = core.executors[b"e"]
        for a, state in zip(assigned, forced):
            ex.tasks[a.tid].state = state
        results = [p.ExecResult(a.tid, a.attempt, end, b"", "", 1.0, 2.0) for a, end in zip(assigned, ends)]
        try:
            core.on_executor(b"e", _sent(p.Report(0, [], results, {}), form), 1.0)
        except IllegalTransition as exc:
            outs.append(str(exc))
            continue
        outs.append((repr(core.take_output().to_clients), sorted(ex.tasks), core.clients[b"c1"].counts))
    assert outs[0] == outs[1]


VALID = st.builds(p.TaskSpec, st.integers(0, 10), st.sampled_from([1, 2]), st.sampled_from([b"b", b""]),
                  st.integers(0, 2), st.sampled_from([0.0, 2.5, math.inf]), needs=st.just(b""), files=st.just(b""))
#: field index -> values that make a spec invalid or not plain
SPOILS = {1: [0, 7], 2: [b"x" * 5], 3: [-1], 4: [-1.0, math.nan], 5: [b"\xc1", nd.encode(nd.make(cpus=2))]}


@st.composite
def batch(draw) -> list[p.TaskSpec]:
    """Valid plain specs, sometimes with one field of one of them spoiled."""
    specs = draw(st.lists(VALID, max_size=12))
    if specs and draw(st.booleans()):
        i, field = draw(st.integers(0, len(specs) - 1)), draw(st.sampled_from(sorted(SPOILS)))
        fields = list(specs[i])
        fields[field] = draw(st.sampled_from(SPOILS[field]))
        specs[i] = p.TaskSpec(*fields)
    return specs


@pytest.mark.parametrize("form", FORMS)
@settings(max_examples=200, deadline=None)
@given(batches=st.lists(batch(), min_size=1, max_size=3), cancel=st.lists(st.integers(0, 10), max_size=3),
       credit=st.integers(0, 30))
def test_batched_submits_and_dispatch_equal_one_by_one(form, batches, cancel, credit):
    outs = []
    for core, how in ((_core(True), form), (_core(False), "records")):
        core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "c1"), 0.0)
        for i, specs in enumerate(batches):
            core.on_client(b"c1", _sent(p.Submit(i + 1, specs), how), 0.0)
        if cancel:
            core.on_client(b"c1", p.Cancel(cancel), 0.0)
        core.on_executor(b"e", p.Register(p.PROTOCOL_VERSION, "e", "h", [], 64, 1024, "linux", 64, 1, {}, []), 0.0)
        core.on_executor(b"e", p.Report(credit, [], [], {}), 0.0)
        core.dispatch(0.0)
        out = core.take_output()
        queued = [(t.seq, t.state, t.kind, t.body, t.walltime_s, t.needs) for t in core.plain_tasks()]
        held = sorted((tid, t.seq, t.attempt, t.state) for tid, t in core.executors[b"e"].tasks.items())
        outs.append((repr(out.to_clients), repr(out.to_executors), core.counts, repr(queued), held,
                     _written(out.journal), repr(out.events)))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("form", FORMS)
@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.tuples(st.sampled_from([b"c1", b"c2"]), st.integers(1, 6)), min_size=1, max_size=4),
       credit=st.integers(0, 30))
def test_a_needs_class_of_several_clients_is_dispatched_as_one_by_one(form, sizes, credit):
    """Tasks of one needs class queue together whoever sent them: a batch of several
    clients' tasks leaves each client's counts as one by one would."""
    needs = nd.encode(nd.make(cpus=1, memory=10))
    outs = []
    for core, how in ((_core(True), form), (_core(False), "records")):
        for peer in (b"c1", b"c2"):
            core.on_client(peer, p.Hello(p.PROTOCOL_VERSION, peer.decode(), peer.decode()), 0.0)
        for i, (peer, n) in enumerate(sizes):
            core.on_client(peer, _sent(p.Submit(i + 1, [p.TaskSpec(i * 10 + s, 1, b"b", 0, 0.0, needs)
                                                       for s in range(n)]), how), 0.0)
        core.on_executor(b"e", p.Register(p.PROTOCOL_VERSION, "e", "h", [], 64, 1024, "linux", 64, 1, {}, []), 0.0)
        core.on_executor(b"e", p.Report(credit, [], [], {}), 0.0)
        core.dispatch(0.0)
        out = core.take_output()
        held = sorted((tid, t.client.peer, t.seq, t.attempt, t.state) for tid, t in core.executors[b"e"].tasks.items())
        outs.append((repr(out.to_executors), core.counts, {peer: c.counts for peer, c in core.clients.items()}, held))
    assert outs[0] == outs[1]
