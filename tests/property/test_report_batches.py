"""The dispatcher applies a Report's results a batch at a time when it can (Core._accept_batch):
whatever an executor reports, the outcome equals judging each result on its own."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import protocol as p
from falconet.dispatcher.core import Config, Core

WALL0 = 1_700_000_000.0
DONE, FAILED, CANCELLED = int(p.TaskState.DONE), int(p.TaskState.FAILED), int(p.TaskState.CANCELLED)
MAX_OUTPUT = 8


def _core(batched: bool) -> Core:
    core = Core(Config(max_output_bytes=MAX_OUTPUT), wall=lambda: WALL0)
    if not batched:
        core._accept_batch = lambda ex, results: 0
    return core


def _setup(core: Core, tasks_per_client: tuple[int, int]) -> list[p.Assignment]:
    """Two clients' tasks, all dispatched to one executor; returns its assignments."""
    for peer, n in zip((b"c1", b"c2"), tasks_per_client):
        core.on_client(peer, p.Hello(p.PROTOCOL_VERSION, peer.decode(), peer.decode()), 0.0)
        core.on_client(peer, p.Submit(1, [p.TaskSpec(s, 1, b"b", 0, 0.0) for s in range(n)]), 0.0)
    core.on_executor(b"e", p.Register(p.PROTOCOL_VERSION, "e", "h", [], 64, 1024, "linux", 64, 1, {}, []), 0.0)
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


@settings(max_examples=150, deadline=None)
@given(split=st.tuples(st.integers(0, 20), st.integers(0, 20)), data=st.data())
def test_batched_results_equal_results_judged_one_by_one(split, data):
    cores = [_core(True), _core(False)]
    assigned = [_setup(core, split) for core in cores]
    assert assigned[0] == assigned[1]
    if not assigned[0]:
        return
    picks = data.draw(st.lists(st.tuples(st.sampled_from(assigned[0]), st.sampled_from(HOWS)), max_size=40))
    started = data.draw(st.lists(st.sampled_from(assigned[0]), max_size=5))
    results = [_result(a, how, i) for i, (a, how) in enumerate(picks)]
    outs = []
    for core in cores:
        core.on_executor(b"e", p.Report(len(results), [(a.tid, a.attempt) for a in started], results, {}), 1.0)
        ex = core.executors[b"e"]
        out = core.take_output()
        outs.append((out.to_clients, out.delivered_files, core.counts, core.stale_results, sorted(ex.tasks),
                     ex.cpus_used, ex.completed, ex.credit,
                     {peer: (c.counts, sorted(c.unacked.items())) for peer, c in core.clients.items()}))
    assert outs[0] == outs[1]


def test_the_usual_report_is_accepted_as_a_batch():
    core = _core(True)
    assigned = _setup(core, (5, 0))
    results = [p.ExecResult(a.tid, a.attempt, DONE, b"ok", "", 1.0, 2.0) for a in assigned]
    assert core._accept_batch(core.executors[b"e"], results) == 5
    assert core.executors[b"e"].tasks == {}
    assert [r.seq for r in core.clients[b"c1"].results] == [0, 1, 2, 3, 4]
