"""concurrent.futures conformance: falconet's executor and futures, tried the way the
standard library's own executor tests try ThreadPoolExecutor and ProcessPoolExecutor.

One real local cluster (a dispatcher and an executor of two slots) serves the module.  A
task is held running by a gate: it waits for a file the test creates, so no test sleeps
to order events.  Every task carries a wall-time limit, which makes the executor hand it
to a slot alone: "running" then means running, never queued behind another in a chunk.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import itertools
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
from cluster_helpers import wait_until

import falconet
from falconet.local import LocalCluster

SLOTS = 2
WALLTIME_S = 600.0  # never reached; it makes every task go to its slot alone
RESULT_S = 60.0  # a bound on waits that should end at once


class Boom(Exception):
    pass


class Box:
    """A result that can be weakly referenced."""

    def __init__(self, n):
        self.n = n


def hold(gate: str, value=None):
    """Return value once the file gate exists (the test opens it)."""
    while not os.path.exists(gate):
        time.sleep(0.005)
    return value


def hold_then_raise(gate: str, message: str):
    hold(gate)
    raise Boom(message)


def explode(message: str):
    raise Boom(message)


def make_box(n):
    return Box(n)


def write_after(gate: str, path: str, value):
    hold(gate)
    Path(path).write_text(str(value))
    return value


@pytest.fixture(scope="module")
def local_cluster():
    cluster = LocalCluster(slots=SLOTS)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(local_cluster):
    c = falconet.Client(local_cluster.client_address, walltime_s=WALLTIME_S)
    try:
        yield c
    finally:
        c.close(cancel=True, wait=False)


class Gates:
    """Files that held tasks wait for; every one is opened when the test ends."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names = itertools.count()
        self.made: list[Path] = []

    def new(self) -> str:
        path = self.folder / f"gate-{next(self.names)}"
        self.made.append(path)
        return str(path)

    @staticmethod
    def open(gate: str) -> None:
        Path(gate).touch()

    def open_all(self) -> None:
        for path in self.made:
            path.touch()


@pytest.fixture
def gates(tmp_path):
    g = Gates(tmp_path)
    try:
        yield g
    finally:
        g.open_all()  # a failed test leaves no slot held for the next one


@pytest.fixture
def pool(client):
    ex = client.executor()
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def fill_slots(pool, gates) -> list[tuple[str, cf.Future]]:
    """Hold every slot with a gated task; return (gate, future) pairs, all running."""
    held = []
    for i in range(SLOTS):
        gate = gates.new()
        held.append((gate, pool.submit(hold, gate, f"held-{i}")))
    wait_until(lambda: all(f.running() for _, f in held), what="every slot running a held task")
    return held


def release(held) -> None:
    for gate, _ in held:
        Gates.open(gate)


# ---------------------------------------------------------------- submit and results


def test_submit_returns_the_value_and_keyword_arguments_travel(pool):
    assert pool.submit(pow, 2, 8).result(RESULT_S) == 256
    assert pool.submit(int, "ff", base=16).result(RESULT_S) == 255
    assert pool.submit(sorted, [3, 1, 2], reverse=True).result(RESULT_S) == [3, 2, 1]


def test_an_exception_propagates_and_exception_returns_it(pool):
    fut = pool.submit(explode, "remote")
    with pytest.raises(Boom, match="remote"):
        fut.result(RESULT_S)
    exc = fut.exception(RESULT_S)
    assert isinstance(exc, Boom) and str(exc) == "remote"
    assert fut.done() and not fut.cancelled() and not fut.running()
    assert pool.submit(abs, -3).exception(RESULT_S) is None


def test_result_and_exception_time_out_while_the_task_runs(pool, gates):
    gate = gates.new()
    fut = pool.submit(hold, gate, "late")
    wait_until(fut.running, what="the held task running")
    with pytest.raises(cf.TimeoutError):
        fut.result(timeout=0)
    with pytest.raises(cf.TimeoutError):
        fut.exception(timeout=0.01)
    Gates.open(gate)
    assert fut.result(RESULT_S) == "late"


# ---------------------------------------------------------------- states and cancel


def test_a_future_goes_pending_running_done(pool, gates):
    held = fill_slots(pool, gates)
    gate = gates.new()
    waiting = pool.submit(hold, gate, "third")
    assert not waiting.running() and not waiting.done()  # no slot free: it cannot start
    release(held[:1])
    wait_until(waiting.running, what="the third task to start in the freed slot")
    assert not waiting.done() and not waiting.cancelled()
    Gates.open(gate)
    assert waiting.result(RESULT_S) == "third"
    assert waiting.done() and not waiting.running() and not waiting.cancelled()
    release(held)


def test_cancel_of_a_running_task_returns_false_and_it_finishes(pool, gates):
    [(gate, fut), *rest] = fill_slots(pool, gates)
    assert fut.cancel() is False and fut.cancel() is False
    assert fut.running() and not fut.cancelled()
    release([(gate, fut), *rest])
    assert fut.result(RESULT_S) == "held-0"


def cancelled_at_the_dispatcher(client) -> int:
    return client.status()["tasks"]["cancelled"]


def test_cancel_of_a_waiting_task_succeeds_twice_and_it_never_runs(client, pool, gates, tmp_path):
    held = fill_slots(pool, gates)
    marker = tmp_path / "ran"
    before = cancelled_at_the_dispatcher(client)
    waiting = pool.submit(write_after, gates.new(), str(marker), 1)
    assert waiting.cancel() is True and waiting.cancel() is True  # a second cancel is harmless
    assert waiting.cancelled() and waiting.done() and not waiting.running()
    # The cancel travels to the dispatcher (and maybe the executor) while the slots stay
    # held; freeing one first would race it, as the README says.
    wait_until(lambda: cancelled_at_the_dispatcher(client) == before + 1, what="the cancel to take effect")
    with pytest.raises(cf.CancelledError):
        waiting.result(0)
    with pytest.raises(cf.CancelledError):
        waiting.exception(0)
    release(held)
    gates.open_all()
    after = pool.submit(abs, -1)  # runs after the cancelled one would have
    assert after.result(RESULT_S) == 1 and [f.result(RESULT_S) for _, f in held] == ["held-0", "held-1"]
    assert not marker.exists()


def test_add_done_callback_before_and_after_done(pool, gates):
    seen: list[cf.Future] = []
    gate = gates.new()
    fut = pool.submit(hold, gate, 5)
    fut.add_done_callback(seen.append)
    assert seen == []
    Gates.open(gate)
    assert fut.result(RESULT_S) == 5
    wait_until(lambda: seen == [fut], what="the callback")
    late: list[cf.Future] = []
    fut.add_done_callback(late.append)  # already done: called at once, in this thread
    assert late == [fut]


def test_add_done_callback_sees_a_cancel(pool, gates):
    held = fill_slots(pool, gates)
    seen: list[bool] = []
    waiting = pool.submit(abs, -1)
    waiting.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert waiting.cancel()
    assert seen == [True]
    release(held)


# ---------------------------------------------------------------- wait and as_completed


def test_as_completed_yields_in_completion_order(pool, gates):
    done_already = pool.submit(abs, -7)
    assert done_already.result(RESULT_S) == 7
    first, second = gates.new(), gates.new()
    a, b = pool.submit(hold, first, "a"), pool.submit(hold, second, "b")
    order = cf.as_completed([a, b, done_already], timeout=RESULT_S)
    assert next(order) is done_already
    Gates.open(second)
    assert next(order) is b
    Gates.open(first)
    assert next(order) is a
    with pytest.raises(StopIteration):
        next(order)


def test_as_completed_times_out_with_work_left(pool, gates):
    gate = gates.new()
    fut = pool.submit(hold, gate)
    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed([fut], timeout=0.05))
    Gates.open(gate)


def test_wait_first_completed(pool, gates):
    quick, slow = gates.new(), gates.new()
    a, b = pool.submit(hold, quick, 1), pool.submit(hold, slow, 2)
    Gates.open(quick)
    done, not_done = cf.wait([a, b], timeout=RESULT_S, return_when=cf.FIRST_COMPLETED)
    assert done == {a} and not_done == {b}
    Gates.open(slow)


def test_wait_first_exception(pool, gates):
    gate = gates.new()
    held = pool.submit(hold, gate)
    fine = pool.submit(abs, -2)
    assert fine.result(RESULT_S) == 2
    bad = pool.submit(explode, "first")
    done, not_done = cf.wait([fine, held, bad], timeout=RESULT_S, return_when=cf.FIRST_EXCEPTION)
    assert done == {fine, bad} and not_done == {held}
    Gates.open(gate)


def test_wait_all_completed_and_its_timeout(pool, gates):
    gate = gates.new()
    futures = [pool.submit(abs, -i) for i in range(20)] + [pool.submit(hold, gate, "last")]
    done, not_done = cf.wait(futures, timeout=0.05)
    assert not_done and futures[-1] in not_done
    Gates.open(gate)
    done, not_done = cf.wait(futures, timeout=RESULT_S, return_when=cf.ALL_COMPLETED)
    assert done == set(futures) and not not_done


# ---------------------------------------------------------------- map


def test_map_keeps_order_whatever_the_finishing_order(pool, gates):
    names = [gates.new() for _ in range(4)]
    values = pool.map(hold, names, range(4))
    for gate in reversed(names):  # the last call finishes first
        Gates.open(gate)
    assert list(values) == [0, 1, 2, 3]
    assert list(pool.map(pow, [2, 3], [5, 2])) == [32, 9]  # several iterables, zipped
    assert list(pool.map(abs, [])) == []


def test_map_raises_at_the_failing_position(pool):
    values = pool.map(lambda x: 1 // x, [1, 2, 0, 4])
    assert next(values) == 1 and next(values) == 0
    with pytest.raises(ZeroDivisionError):
        next(values)


def test_map_timeout_counts_from_the_call_and_cancels_the_rest(pool, gates):
    gate = gates.new()
    held = fill_slots(pool, gates)
    values = pool.map(hold, [gate] * 3, timeout=0.05)
    with pytest.raises(cf.TimeoutError):
        next(values)
    release(held)
    Gates.open(gate)
    with pytest.raises(StopIteration):
        next(values)  # the iterator is over: the calls not yet yielded were cancelled


def test_map_submits_everything_at_once(pool, gates, tmp_path):
    gate = gates.new()
    pool.map(write_after, [gate] * 4, [str(tmp_path / f"out-{i}") for i in range(4)], range(4))
    Gates.open(gate)
    wait_until(lambda: all((tmp_path / f"out-{i}").exists() for i in range(4)),
               what="every call of an un-iterated map to run")


def test_map_keeps_no_result_once_yielded(pool):
    values = pool.map(make_box, range(3))
    first = next(values)
    assert first.n == 0
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None, "the map iterator still holds a result it yielded"
    assert [b.n for b in values] == [1, 2]


# ---------------------------------------------------------------- shutdown


def test_shutdown_wait_waits_for_an_un_iterated_map(client, gates, tmp_path):
    pool = client.executor()
    gate = gates.new()
    pool.map(write_after, [gate] * 3, [str(tmp_path / f"m-{i}") for i in range(3)], range(3))
    waiter = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "shutdown(wait=True) returned while the map's calls were held"
    Gates.open(gate)
    waiter.join(RESULT_S)
    assert not waiter.is_alive()
    assert sorted(p.name for p in tmp_path.glob("m-*")) == ["m-0", "m-1", "m-2"]


def test_shutdown_cancel_futures_spares_running_tasks_and_user_cancels(client, gates):
    pool = client.executor()
    held = fill_slots(pool, gates)
    waiting = [pool.submit(abs, -i) for i in range(5)]
    assert waiting[0].cancel()  # cancelled by the user first: shutdown must not choke on it
    threading.Timer(0.1, release, (held,)).start()
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in waiting)
    assert [f.result(0) for _, f in held] == ["held-0", "held-1"]
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(abs, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.map(abs, [1])


def test_shutdown_without_wait_returns_at_once(client, gates):
    pool = client.executor()
    gate = gates.new()
    fut = pool.submit(hold, gate, "kept")
    pool.shutdown(wait=False)
    assert not fut.done()
    Gates.open(gate)
    assert fut.result(RESULT_S) == "kept"


def test_the_executor_as_a_context_manager_waits(client, gates):
    gate = gates.new()
    with client.executor() as pool:
        fut = pool.submit(hold, gate, "waited")
        threading.Timer(0.1, Gates.open, (gate,)).start()
    assert fut.done() and fut.result(0) == "waited"


# ---------------------------------------------------------------- leaving a client


def test_leaving_a_client_block_waits_for_its_work(local_cluster, gates, tmp_path):
    gate = gates.new()
    futures = []

    def body():
        with falconet.Client(local_cluster.client_address, walltime_s=WALLTIME_S) as c:
            futures.append(c.submit(write_after, gate, str(tmp_path / "done"), "finished"))

    leaver = threading.Thread(target=body)
    leaver.start()
    leaver.join(0.3)
    assert leaver.is_alive(), "leaving the block did not wait for the task"
    Gates.open(gate)
    leaver.join(RESULT_S)
    assert futures[0].result(0) == "finished" and (tmp_path / "done").read_text() == "finished"


_SCRIPT = """
import os, sys, time
import falconet

def task(started, gate, out):
    open(started, "w").close()
    while not os.path.exists(gate):
        time.sleep(0.005)
    open(out, "w").write("done")

client = falconet.Client(sys.argv[1])
client.submit(task, *sys.argv[2:5])
print("submitted", flush=True)
# the script ends here, its client open and its task running
"""


def test_a_script_that_ends_with_a_client_open_waits_for_its_work(local_cluster, gates, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT)
    started, gate, out = tmp_path / "started", gates.new(), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), local_cluster.client_address, str(started), gate,
                             str(out)], stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        assert proc.stdout.readline() == b"submitted\n"
        wait_until(started.exists, what="the script's task to start")
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.3)  # its main code is over: it waits for the task
        Gates.open(gate)
        assert proc.wait(RESULT_S) == 0
        assert out.read_text() == "done"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_close_without_wait_returns_at_once_and_fails_what_is_left(local_cluster, gates):
    c = falconet.Client(local_cluster.client_address, walltime_s=WALLTIME_S)
    fut = c.submit(hold, gates.new())
    wait_until(fut.running, what="the held task running")
    c.close(wait=False)
    with pytest.raises(RuntimeError, match="closed before this task finished"):
        fut.result(0)


def test_a_block_left_by_an_error_cancels_what_has_not_started(local_cluster, gates):
    c = falconet.Client(local_cluster.client_address, walltime_s=WALLTIME_S)
    with pytest.raises(Boom), c:
        held = [c.submit(hold, gates.new()) for _ in range(SLOTS)]
        wait_until(lambda: all(f.running() for f in held), what="held tasks running")
        waiting = c.submit(abs, -1)
        raise Boom("leave now")
    assert waiting.cancelled()


# ---------------------------------------------------------------- workers


def test_max_workers_follows_the_slots_of_the_fleet():
    with LocalCluster(slots=2) as cluster, falconet.Client(cluster.client_address) as c:
        pool = c.executor()
        wait_until(lambda: pool.max_workers == 2, what="two slots")
        assert pool._max_workers == 2 and c.slots() == 2
        cluster.add_executor(slots=3)
        wait_until(lambda: pool._max_workers == 5, what="the second executor's slots counted")
