"""The futures a client hands out: results into values, cancelling, map's order and timeout."""

from __future__ import annotations

import concurrent.futures as cf

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

    values = results_in_order(futures, timeout=4.0, clock=clock)
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

