"""Requirements end to end: a real dispatcher and executors of different sizes and tags."""

from __future__ import annotations

import threading
import time

import pytest
from cluster_helpers import wait_until

import falconet


def _nap(seconds: float) -> float:
    time.sleep(seconds)  # the task's own work: it must hold its cpus for a while
    return seconds


def _overlaps(infos: list[tuple[float, float, int]]) -> int:
    """The most cpus held at once by tasks given as (started, finished, cpus)."""
    events = sorted([(s, c) for s, _, c in infos] + [(f, -c) for _, f, c in infos], key=lambda e: (e[0], e[1]))
    held = most = 0
    for _, delta in events:
        held += delta
        most = max(most, held)
    return most


@pytest.fixture
def fleet(cluster):
    """small: 2 cpus; big: 4 cpus tagged gpu; cloud: 2 cpus tagged site=cloud."""
    cluster.start_dispatcher()
    cluster.start_executor("small", 2, "--cpus", "2")
    cluster.start_executor("big", 4, "--cpus", "4", "--tag", "gpu")
    cluster.start_executor("cloud", 2, "--cpus", "2", "--tag", "site=cloud")
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"small", "big", "cloud"}, what="three executors")
        yield client


def test_a_mixed_workload_runs_each_task_where_it_fits_and_never_over_packs(fleet):
    client = fleet
    quad = [client.submit_python(_nap, (0.05,), cpus=4) for _ in range(6)]
    gpu = [client.submit_python(_nap, (0.02,), tags=["gpu"]) for _ in range(8)]
    cloud = [client.submit_python(_nap, (0.02,), where="cloud") for _ in range(8)]
    local = [client.submit_python(_nap, (0.02,), where="local", cpus=2) for _ in range(8)]
    plain = [client.submit_python(_nap, (0.01,)) for _ in range(40)]
    everything = quad + gpu + cloud + local + plain
    for f in everything:
        f.result(timeout=60)
    assert {f.info.executor for f in quad} == {"big"}
    assert {f.info.executor for f in gpu} == {"big"}
    assert {f.info.executor for f in cloud} == {"cloud"}
    assert {f.info.executor for f in local} <= {"small", "big"}
    assert {f.info.executor for f in plain} <= {"small", "big", "cloud"}
    cpus = {id(f): c for c, group in ((4, quad), (1, gpu), (1, cloud), (2, local), (1, plain)) for f in group}
    for name, capacity in (("big", 4), ("small", 2), ("cloud", 2)):
        ran = [(f.info.started, f.info.finished, cpus[id(f)]) for f in everything if f.info.executor == name]
        assert _overlaps(ran) <= capacity, f"{name} ran more than {capacity} cpus of tasks at once"


def test_a_large_task_is_not_starved_by_a_stream_of_small_ones(cluster):
    cluster.start_dispatcher(extra=("--reserve-after", "0.5"))
    cluster.start_executor("only", 2, "--cpus", "2")
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"only"}, what="the executor")
        stream: list = []
        stop = threading.Event()

        def keep_busy() -> None:  # always more small work waiting than the slots can run
            while not stop.is_set():
                stream.extend(client.submit_python(_nap, (0.02,)) for _ in range(10))
                wait_until(lambda: sum(not f.done() for f in stream) < 20, 30, "the stream to drain")

        feeder = threading.Thread(target=keep_busy)
        feeder.start()
        try:
            wait_until(lambda: sum(f.done() for f in stream) >= 20, what="the stream to flow")
            big = client.submit_python(_nap, (0.05,), cpus=2)
            big.result(timeout=30)
            done_before = sum(f.done() for f in stream)
            wait_until(lambda: sum(f.done() for f in stream) > done_before + 20, what="the stream to go on")
        finally:
            stop.set()
            feeder.join()
        for f in stream:
            f.result(timeout=60)
        after = [f for f in stream if f.info.started > big.info.finished]
        assert after, "small tasks kept coming after the large one finished"
        overlapping = [f for f in stream if f.info.started < big.info.finished and f.info.finished > big.info.started]
        assert not overlapping, "a 1-cpu task ran beside the 2-cpu task on a 2-cpu executor"


def test_an_unschedulable_task_is_reported_and_runs_once_a_big_enough_executor_joins(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("two", 2, "--cpus", "2")
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"two"}, what="the executor")
        fut = client.submit_command("echo wide", cpus=8)
        row = wait_until(lambda: client.status()["unschedulable"], what="the task shown as unschedulable")[0]
        assert row["count"] == 1 and row["needs"]["cpus"] == 8
        assert "needs 8 cpus, has 2" in row["reason"]
        cluster.start_executor("eight", 1, "--cpus", "8")
        result = fut.result(timeout=30)
        assert result.stdout == "wide\n" and fut.info.executor == "eight"
        assert client.status()["unschedulable"] == []


def test_fail_unschedulable_fails_the_task_with_the_reason(cluster):
    cluster.start_dispatcher(extra=("--fail-unschedulable", "1"))
    cluster.start_executor("one", 1, "--cpus", "1")
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"one"}, what="the executor")
        bad = client.submit_command("true", tags=["gpu"])
        good = client.submit_command("true")
        with pytest.raises(falconet.TaskError, match=r"unschedulable: needs .*lacks tag gpu.* \(failed after 1s, --fail-unschedulable\)"):
            bad.result(timeout=30)
        assert good.result(timeout=30).ok
