"""Events: what the loop records, how they expand, and the bounded history (memory and disk)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import protocol as p
from falconet import tasks as tk
from falconet.dispatcher import events as ev
from falconet.dispatcher.core import Config, Core
from falconet.reports import Fleet, FleetNode

_DONE, _FAILED = int(p.TaskState.DONE), int(p.TaskState.FAILED)


def _result(seq: int, state: int = _DONE, output: bytes = b"", reason: str = "") -> p.TaskResult:
    return p.TaskResult(seq, state, output, reason, "ex-1", 1, 100.0, 100.5, 102.0)


def _events(n: int, start: int = 0) -> list[tuple]:
    """n compact records of one submitted task each, at 1000 + their task number."""
    return [(ev.SUBMITTED, 1000.0 + start + i, "c", [start + i]) for i in range(n)]


def _expanded(raw: tuple) -> list[tuple]:
    record = ev.compact(raw)
    assert ev.count(record) == len(list(ev.expand(record)))
    return list(ev.expand(record))


# ---------------------------------------------------------------- expansion


def test_each_raw_record_expands_to_one_event_per_task():
    specs = [p.TaskSpec(7, 1, b"", 0, 0.0), p.TaskSpec(8, 1, b"", 0, 0.0)]
    assert _expanded((ev.SUBMITTED, 5.0, "c", [s.seq for s in specs])) == [("submitted", 5.0, "c", 7),
                                                                          ("submitted", 5.0, "c", 8)]
    assert ev.compact((ev.SUBMITTED, 5.0, "c", [7, 8, 9]))[3] == range(7, 10)  # consecutive: a range
    assert _expanded((ev.SUBMITTED, 5.0, "c", [9, 7, 8])) == [("submitted", 5.0, "c", s) for s in (9, 7, 8)]
    assert _expanded((ev.SUBMITTED, 5.0, "c", [7, 9, 9])) == [("submitted", 5.0, "c", s) for s in (7, 9, 9)]
    assert _expanded((ev.STARTED, 6.0, "ex", [("c", 7, 2)])) == [("started", 6.0, "c", 7, "ex", 2)]
    assert _expanded((ev.FINISHED, 7.0, "c", [])) == []
    (done,) = _expanded((ev.FINISHED, 7.0, "c", [_result(7)]))
    m = ev.as_map((41, *done))
    assert m == {"n": 41, "event": "finished", "at": 7.0, "client": "c", "task": 7, "executor": "ex-1",
                 "attempt": 1, "outcome": "done", "wait_s": 0.5, "run_s": 1.5, "reason": ""}
    (lost,) = _expanded((ev.EXECUTOR, 8.0, "lost", "ex", "host", "silent"))
    assert ev.as_map((1, *lost))["detail"] == "silent"


def test_a_task_that_never_ran_has_no_wait_or_run_time():
    never = p.TaskResult(3, int(p.TaskState.CANCELLED), b"", "cancelled", "", 0, 100.0, 0.0, 101.0)
    (e,) = _expanded((ev.FINISHED, 1.0, "c", [never]))
    assert ev.as_map((1, *e))["wait_s"] is None and ev.as_map((1, *e))["outcome"] == "cancelled"


def test_a_failed_command_shows_its_exit_code_and_stderr_tail():
    out = tk.encode_command_output(3, b"", b"x" * 1000 + b"the end", False)
    f = ev.failure(_result(9, _FAILED, out, "exit code 3"), "c", 5.0)
    assert f["exit_code"] == 3 and f["stderr_tail"].endswith("the end") and len(f["stderr_tail"]) == 400
    py = ev.failure(_result(9, _FAILED, b"\x93not a command", "ValueError: no"), "c", 5.0)
    assert py["exit_code"] is None and py["reason"] == "ValueError: no"


def test_fleet_reports_become_launched_and_terminated_events():
    def fleet(*ids: str) -> Fleet:
        return Fleet("ec2", "c", "additive", 0, 4, 1.0, {}, 0, nodes=tuple(FleetNode(i, "t3.micro", "idle", 1.0)
                                                                           for i in ids))
    assert [e[2:4] for e in ev.fleet_changes(None, fleet("i-1"), 1.0)] == [("launched", "i-1")]
    changes = ev.fleet_changes(fleet("i-1", "i-2"), fleet("i-2", "i-3"), 2.0)
    assert sorted(e[2:4] for e in changes) == [("launched", "i-3"), ("terminated", "i-1")]


def test_the_core_records_events_only_when_observed():
    core = Core(Config())
    core.on_client(b"c", p.Hello(p.PROTOCOL_VERSION, "id", "me"), 0.0)
    core.on_client(b"c", p.Submit(1, [p.TaskSpec(1, 1, b"", 0, 0.0)]), 0.0)
    assert core.take_output().events == []  # not observed: nothing kept
    core.events = []
    core.on_executor(b"e", p.Register(p.PROTOCOL_VERSION, "ex", "h", ["10.0.0.1"], 2, 1024, "linux", 2, 1, {},
                                      []), 0.0)
    core.on_client(b"c", p.Submit(2, [p.TaskSpec(2, 1, b"", 0, 0.0)]), 0.0)
    core.on_executor(b"e", p.Report(2, [], [], {}), 0.0)
    core.dispatch(0.0)
    first = core.take_output()
    (tasks_msg,) = [m for _, m in first.to_executors if type(m) is p.Tasks]
    a = tasks_msg.tasks[0]
    core.on_executor(b"e", p.Report(0, [(a.tid, a.attempt)], [], {}), 0.1)
    core.on_executor(b"e", p.Report(1, [], [p.ExecResult(a.tid, a.attempt, _DONE, b"", "", 1.0, 2.0)], {}), 0.2)
    kinds = [e[0] for r in first.events + core.take_output().events for e in _expanded(r)]
    assert kinds == ["joined", "submitted", "started", "finished"]


# ---------------------------------------------------------------- the history


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=40), st.integers(1, 50), st.integers(0, 400), st.integers(1, 60))
def test_the_history_keeps_the_latest_events_numbered_without_gaps(batches, keep, after, limit):
    h = ev.History(keep)
    total = 0
    for n in batches:  # a drain of n records
        assert h.add(_events(n, total)) == n
        total += n
    assert h.next == total + 1
    assert h.count <= keep  # one event a record here: the bound is exact
    kept = h.read(0, 0.0, 10**6)["events"]
    assert [e["n"] for e in kept] == list(range(total - len(kept) + 1, total + 1))
    assert [e["task"] for e in kept] == [e["n"] - 1 for e in kept]
    assert len(kept) == min(total, keep)
    got = h.read(after, 0.0, limit)
    want = [e["n"] for e in kept if e["n"] > after][:limit]
    assert [e["n"] for e in got["events"]] == want
    assert got["more"] == (len([e for e in kept if e["n"] > after]) > limit)
    if not got["more"]:
        assert got["next"] == total  # everything considered
    else:
        assert got["next"] == want[-1]


def test_since_skips_older_events_and_a_follower_sees_only_new_ones():
    h = ev.History(100)
    h.add(_events(10))  # at 1000.0 .. 1009.0
    got = h.read(0, 1005.0, 100)
    assert [e["task"] for e in got["events"]] == [5, 6, 7, 8, 9]
    again = h.read(got["next"], 0.0, 100)
    assert again["events"] == [] and again["next"] == got["next"]
    h.add(_events(2, 10))
    assert [e["task"] for e in h.read(got["next"], 0.0, 100)["events"]] == [10, 11]


def test_on_disk_the_history_survives_a_restart_within_its_bound(tmp_path):
    h = ev.History(100, tmp_path / "events")
    for i in range(30):
        h.add(_events(20, 20 * i))  # 600 events: segments of 50 rotate
    h.close()
    files = list((tmp_path / "events").glob("events-*.msgpack"))
    assert 1 <= len(files) <= 2
    again = ev.History(100, tmp_path / "events")
    assert again.next == 601  # numbering goes on
    kept = again.read(0, 0.0, 1000)["events"]
    assert kept and kept[-1]["n"] == 600 and kept[-1]["task"] == 599
    assert 100 <= len(kept) <= 150  # the bound: keep (the rest of the segments stays on disk)
    again.add(_events(1, 600))
    assert again.read(600, 0.0, 10)["events"][0]["n"] == 601
    again.close()


def test_a_damaged_segment_is_read_up_to_the_damage(tmp_path):
    h = ev.History(100, tmp_path)
    h.add(_events(5))
    h.close()
    (seg,) = tmp_path.glob("events-*.msgpack")
    seg.write_bytes(seg.read_bytes() + b"\xc1\xc1garbage")
    again = ev.History(100, tmp_path)
    assert [e["n"] for e in again.read(0, 0.0, 10)["events"]] == [1, 2, 3, 4, 5]
    again.close()
