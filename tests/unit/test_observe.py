"""The observer: histograms, failures and the chart from the loop's raw records."""

from __future__ import annotations

import bisect

from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import protocol as p
from falconet import tasks as tk
from falconet.dispatcher import events as ev
from falconet.dispatcher import observe as ob

_DONE, _FAILED, _CANCELLED = (int(s) for s in (p.TaskState.DONE, p.TaskState.FAILED, p.TaskState.CANCELLED))
EPOCH = 1.8e9


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(-5, 1e4, allow_nan=False), max_size=60))
def test_counting_sorted_values_at_once_is_counting_them_one_by_one(values):
    one, many = ob.Histogram(ob.TASK_BUCKETS), ob.Histogram(ob.TASK_BUCKETS)
    for v in values:
        one.observe(v)
    many.observe_sorted(sorted(values))
    assert one.counts == many.counts and one.count == many.count == len(values)
    assert abs(one.sum - many.sum) <= 1e-6 * max(1.0, abs(one.sum))
    cum = many.cumulative()
    assert cum[-1] == ("+Inf", len(values)) and [n for _, n in cum] == sorted(n for _, n in cum)
    assert all(n == bisect.bisect_right(sorted(values), float(le)) for le, n in cum[:-1])


def _results(specs: list[tuple[int, float, float]]) -> list[p.TaskResult]:
    """(state, wait, run) -> results; run < 0 means it never ran."""
    out = []
    for seq, (state, wait, run) in enumerate(specs):
        started = 0.0 if run < 0 else EPOCH + wait
        output = tk.encode_command_output(5, b"", b"oops", False) if state == _FAILED else b""
        out.append(p.TaskResult(seq, state, output, "exit code 5" if state == _FAILED else "", "ex", 1, EPOCH,
                                started, EPOCH + 1.0 if run < 0 else started + run))  # as Core._finish
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([_DONE, _FAILED, _CANCELLED]), st.floats(0, 100),
                          st.one_of(st.just(-1.0), st.floats(0, 100))), max_size=40))
def test_the_observer_times_the_tasks_that_ran_and_keeps_the_failures(specs):
    obs = ob.Observer(keep_events=1000, timings=True)
    try:
        obs._stop = True  # drained by hand here
        obs.thread.join()
        results = _results(specs)
        obs.note([(ev.FINISHED, 5.0, "c", results)])
        obs.drain()
        ran = [s for s in specs if s[2] >= 0]
        wait, run = obs.histograms()
        assert wait.count == run.count == len(ran)
        assert abs(run.sum - sum(s[2] for s in ran)) < 1e-3
        failed = [r for r in results if r.state == _FAILED][-ob.FAILURES:]
        assert [f["seq"] for f in obs.failures] == [r.seq for r in failed]
        assert all(f["exit_code"] == 5 and f["stderr_tail"] == "oops" for f in obs.failures)
        assert obs.recorded == len(results)
        assert [e["task"] for e in obs.events(0, 0.0, 1000)["events"]] == [r.seq for r in results]
    finally:
        obs.close()


def test_a_thread_that_falls_behind_drops_the_oldest_and_counts_them(monkeypatch):
    monkeypatch.setattr(ob, "MAX_RAW", 3)
    obs = ob.Observer(keep_events=1000)
    obs._stop = True
    obs.thread.join()
    for i in range(5):
        obs.note([(ev.SUBMITTED, float(i), "c", list(range(10 * i, 10 * i + 10)))])
    obs.drain()
    assert obs.dropped == 20 and obs.recorded == 30
    assert obs.events(0, 0.0, 100)["dropped"] == 20
    obs.close()
