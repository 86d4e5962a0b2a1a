"""The futures a client hands out: results into values, cancelling, map's order and timeout."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import threading
import weakref

import pytest

from falconet import protocol as p
from falconet import tasks
from falconet.errors import TaskError
from falconet.futures import FalconetExecutor, FuturesExecutor, TaskFuture, results_in_order, settle

DONE, FAILED, CANCELLED = int(p.TaskState.DONE), int(p.TaskState.FAILED), int(p.TaskState.CANCELLED)
PYTHON, COMMAND = int(p.TaskKind.PYTHON), int(p.TaskKind.COMMAND)


class Recorder:
    """Stands for the Client: records what futures and the executor ask of it."""

    def __init__(self):
        self.cancels: list[int] = []
        self.seq = 0

    def _cancel(self, seq: int) -> None:
        self.cancels.append(seq)

    def submit(self, fn, *args, **kwargs) -> TaskFuture:
        self.seq += 1
        return TaskFuture(self, self.seq, PYTHON, fn.__name__)

    def map_futures(self, fn, *iterables) -> list[TaskFuture]:
        return [self.submit(fn, *args) for args in zip(*iterables)]

    def slots(self) -> int:
        return 12


def result(seq, state=DONE, output=b"", reason=""):
    return p.TaskResult(seq, state, output, reason, "ex1", 2, 1.0, 2.0, 3.0)


def test_a_python_result_is_the_value_or_the_remote_exception():
    ok, bad = TaskFuture(Recorder(), 1, PYTHON), TaskFuture(Recorder(), 2, PYTHON)
    settle(ok, result(1, output=tasks.encode_python_value({"x": 1})))
    settle(bad, result(2, output=tasks.encode_python_error(KeyError("k"), "Traceback...")))
    assert ok.result(0) == {"x": 1}
    with pytest.raises(KeyError):
        bad.result(0)


def test_a_command_result_carries_its_timings_and_outputs():
    fut = TaskFuture(Recorder(), 1, COMMAND, "echo")
    fut.outputs = {"out": "/tmp/out"}
    settle(fut, result(1, output=tasks.encode_command_output(3, b"o", b"e", True)))
    r = fut.result(0)
    assert (r.exit_code, r.stdout, r.stderr, r.truncated, r.executor, r.attempts) == (3, "o", "e", True, "ex1", 2)
    assert r.timings == {"submitted": 1.0, "started": 2.0, "finished": 3.0} and r.outputs == {"out": "/tmp/out"}


@pytest.mark.parametrize("kind", [PYTHON, COMMAND])
def test_a_result_with_no_output_is_a_task_error(kind):
    fut = TaskFuture(Recorder(), 1, kind)
    settle(fut, result(1, FAILED, reason="executor ex1 lost"))
    with pytest.raises(TaskError, match="executor ex1 lost"):
        fut.result(0)


def test_a_cancelled_result_cancels_even_an_already_cancelled_future():
    fut = TaskFuture(Recorder(), 1, PYTHON)
    settle(fut, result(1, CANCELLED))
    assert fut.cancelled()
    settle(fut, result(1, CANCELLED))  # no RuntimeError from concurrent.futures
    assert fut.cancelled()


def test_cancel_tells_the_client_once_and_a_second_cancel_is_harmless():
    client = Recorder()
    fut = TaskFuture(client, 7, PYTHON)
    assert fut.cancel() and fut.cancel() and fut.cancel_here()
    assert client.cancels == [7]
    assert cf.wait([fut], timeout=0).done == {fut}


def test_a_finished_future_cannot_be_cancelled():
    client = Recorder()
    fut = TaskFuture(client, 1, PYTHON)
    fut.set_result(1)
    assert not fut.cancel() and not fut.cancel_here() and client.cancels == []


def test_results_in_order_times_out_on_the_injected_clock_and_cancels_the_rest():
    client = Recorder()
    futures = [TaskFuture(client, seq, PYTHON) for seq in (1, 2, 3)]
    futures[0].set_result("a")
    now = [100.0]

    def clock():
        now[0] += 5.0  # each look at the clock costs 5 s
        return now[0]

    values = results_in_order(list(futures), timeout=4.0, clock=clock)
    assert next(values) == "a"
    with pytest.raises(cf.TimeoutError):
        next(values)  # the deadline passed: waits 0 s
    assert futures[1].cancelled() and futures[2].cancelled() and client.cancels == [2, 3]


def test_futures_executor_submits_through_the_client_and_shutdown_cancels():
    client = Recorder()
    ex = FuturesExecutor(client)
    a, b = ex.submit(abs, -1), ex.submit(abs, -2)
    a.set_result(1)
    ex.shutdown(wait=True, cancel_futures=True)
    assert b.cancelled() and client.cancels == [2]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(abs, 1)
    assert FalconetExecutor is FuturesExecutor



def test_shutdown_cancels_only_futures_not_started_and_tolerates_a_user_cancel():
    client = Recorder()
    ex = FuturesExecutor(client)
    running, cancelled, waiting = ex.submit(abs, -1), ex.submit(abs, -2), ex.submit(abs, -3)
    assert running.mark_running() and cancelled.cancel()
    done = threading.Timer(0.05, running.set_result, (1,))  # the running one finishes later
    done.start()
    ex.shutdown(wait=True, cancel_futures=True)  # no RuntimeError for the one cancelled before
    assert running.result(0) == 1 and waiting.cancelled() and client.cancels == [2, 3]


def test_mark_running_only_moves_a_pending_future():
    client = Recorder()
    a, b, c = (TaskFuture(client, seq, PYTHON) for seq in (1, 2, 3))
    assert a.mark_running() and a.running() and not a.cancel() and not a.mark_running()
    b.cancel()
    c.set_result(3)
    assert not b.mark_running() and not c.mark_running() and b.cancelled() and c.result(0) == 3


def test_executor_map_futures_are_awaited_by_shutdown_even_when_not_iterated():
    client = Recorder()
    ex = FuturesExecutor(client)
    values = ex.map(abs, [-1, -2])
    futures = list(ex._futures)
    assert len(futures) == 2
    threading.Timer(0.05, lambda: [f.set_result(f.seq) for f in futures]).start()
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures) and list(values) == [1, 2]


class Box:
    """A result that can be weakly referenced."""


def test_map_drops_each_future_and_its_result_once_yielded():
    client = Recorder()
    futures = [TaskFuture(client, seq, PYTHON) for seq in (1, 2)]
    for f in futures:
        f.set_result(Box())
    first = weakref.ref(futures[0].result(0))
    values = results_in_order(futures, timeout=None)  # takes the list
    futures = None
    next(values)  # the value is thrown away at once
    gc.collect()
    assert first() is None
    assert isinstance(next(values), Box)


def test_map_timeout_counts_from_the_call_not_from_the_first_next():
    client = Recorder()
    now = [100.0]
    futures = [TaskFuture(client, 1, PYTHON)]
    values = results_in_order(futures, timeout=3.0, clock=lambda: now[0])
    now[0] += 5.0  # the caller looks at the iterator later than the timeout
    with pytest.raises(cf.TimeoutError):
        next(values)


def test_the_executor_reports_the_clients_slots_as_its_max_workers():
    ex = FuturesExecutor(Recorder())
    assert ex.max_workers == ex._max_workers == 12


# --- what a queued future costs: its Condition is made only when something locks it -------------


def test_a_task_future_has_every_field_of_a_plain_future():
    plain = set(vars(cf.Future())) - {"_condition"}
    fut = TaskFuture(Recorder(), 1, COMMAND, "true")
    assert all(hasattr(fut, name) for name in plain), [name for name in plain if not hasattr(fut, name)]
    assert len(vars(fut)) == 4, "a queued future holds only its own fields"
    assert isinstance(fut._condition, type(cf.Future()._condition))
    assert fut._waiters == [] and fut._done_callbacks == [], "made with the Condition, each its own"
    assert TaskFuture(Recorder(), 2, COMMAND)._waiters == ()


def test_a_queued_future_with_a_callback_holds_no_condition_until_it_finishes():
    fut = TaskFuture(Recorder(), 1, COMMAND, "true")
    seen = []
    fut.add_done_callback(seen.append)
    assert fut._made_condition is None and not fut.done()
    fut.set_result("x")
    assert seen == [fut] and fut.result(0) == "x"
    late = []
    fut.add_done_callback(late.append)  # on a done future: called at once, as cf.Future does
    assert late == [fut]


def test_one_condition_per_future_when_threads_race_for_it():
    fut = TaskFuture(Recorder(), 1, COMMAND, "true")
    made, barrier = [], threading.Barrier(8)

    def grab():
        barrier.wait()
        made.append(fut._condition)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in made}) == 1


def test_callbacks_added_while_another_thread_finishes_the_future_all_run():
    for _ in range(200):
        fut = TaskFuture(Recorder(), 1, COMMAND, "true")
        seen: list[int] = []
        finisher = threading.Thread(target=fut.set_result, args=("x",))
        finisher.start()
        for i in range(20):
            fut.add_done_callback(lambda f, i=i, seen=seen: seen.append(i))
        finisher.join()
        assert sorted(seen) == list(range(20))
    assert cf.wait([fut], timeout=1).done == {fut}


def test_a_future_finishes_and_is_read_without_making_a_condition():
    ok, bad = TaskFuture(Recorder(), 1, PYTHON), TaskFuture(Recorder(), 2, PYTHON)
    assert ok.mark_running() and ok.running() and not ok.done()
    settle(ok, result(1, output=tasks.encode_python_value(7)))
    settle(bad, result(2, output=tasks.encode_python_error(KeyError("k"), "tb")))
    assert ok.done() and not ok.running() and not ok.cancelled() and ok.result() == 7 and ok.exception() is None
    assert isinstance(bad.exception(), KeyError)
    with pytest.raises(KeyError):
        bad.result()
    assert ok._made_condition is None and bad._made_condition is None
    with pytest.raises(cf.InvalidStateError):
        ok.set_result(8)
    assert not ok.mark_running() and ok.result() == 7
    assert cf.wait([ok, bad], timeout=0).done == {ok, bad}
    assert list(cf.as_completed([ok, bad], timeout=0)) != []


def test_a_waiter_is_woken_by_a_result_set_from_another_thread():
    """Waiting makes the Condition; setting then takes the standard path and wakes it, in
    whichever order the two threads get there."""
    for _ in range(300):
        fut = TaskFuture(Recorder(), 1, PYTHON)
        got: list = []
        waiter = threading.Thread(target=lambda f=fut, got=got: got.append(f.result(timeout=10)))
        waiter.start()
        fut.set_result("v")
        waiter.join()
        assert got == ["v"]


def test_a_cancelled_future_is_not_finished_quietly():
    fut = TaskFuture(Recorder(), 1, PYTHON)
    assert fut.cancel() and fut.cancelled() and fut.done()
    with pytest.raises(cf.InvalidStateError):
        fut.set_result(1)
    with pytest.raises(cf.CancelledError):
        fut.result(0)


def test_mark_all_running_moves_only_pending_futures_with_or_without_a_condition():
    plain, waited, done, cancelled = (TaskFuture(Recorder(), i, PYTHON) for i in range(4))
    assert waited._condition is not None  # someone waits on it: it has its Condition
    done.set_result(1)
    cancelled.cancel()
    TaskFuture.mark_all_running([plain, waited, done, cancelled])
    assert plain.running() and waited.running() and plain._made_condition is None
    assert done.result() == 1 and cancelled.cancelled()
