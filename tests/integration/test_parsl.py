"""falconet.parsl.FalconetExecutor under Parsl's DataFlowKernel, on real falconet processes.

Parsl is an optional extra (falconet[parsl]) that pins pytest<8, so the main test
environment does not have it; .ci/parsl.sh runs these tests in a Parsl environment.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

parsl = pytest.importorskip(
    "parsl", reason="Parsl is not installed: pip install '.[parsl]' (.ci/parsl.sh runs these tests)")

from cluster_helpers import wait_until  # noqa: E402
from parsl.app.errors import BashExitFailure  # noqa: E402
from parsl.config import Config  # noqa: E402
from parsl.executors.errors import InvalidResourceSpecification  # noqa: E402

from falconet.errors import TaskError  # noqa: E402
from falconet.parsl import FalconetExecutor  # noqa: E402

TIMEOUT_S = 60


class Odd(Exception):
    pass


@parsl.python_app
def square(x, parsl_resource_specification=None):
    return x * x


@parsl.python_app
def fail(message):
    raise Odd(message)


@parsl.python_app
def nap(seconds, parsl_resource_specification=None):
    import time

    time.sleep(seconds)  # the task's work, not synchronisation
    return seconds


@parsl.bash_app
def shout(word, stdout=None, stderr=None):
    return f"echo {word}; echo {word}-err >&2"


@parsl.bash_app
def exit_with(code):
    return f"exit {code}"


def config(tmp_path: Path, executor: FalconetExecutor, **options) -> Config:
    return Config(executors=[executor], run_dir=str(tmp_path / "runinfo"), **options)


def exec_future(app_future):
    """The falconet TaskFuture behind a Parsl AppFuture (needs garbage_collect=False)."""
    return parsl.dfk().tasks[app_future.tid]["exec_fu"]


def test_python_and_bash_apps_on_an_embedded_cluster(tmp_path: Path):
    with parsl.load(config(tmp_path, FalconetExecutor(slots=2))):
        squares = [square(i) for i in range(20)]
        out, err = tmp_path / "shout.out", tmp_path / "shout.err"
        said = shout("hello", stdout=str(out), stderr=str(err))
        failed = exit_with(3)
        raised = fail("odd one")
        assert [f.result(timeout=TIMEOUT_S) for f in squares] == [i * i for i in range(20)]
        assert said.result(timeout=TIMEOUT_S) == 0
        assert out.read_text() == "hello\n"
        assert err.read_text().endswith("--> end executable <--\nhello-err\n")  # Parsl echoes the script
        with pytest.raises(BashExitFailure) as info:
            failed.result(timeout=TIMEOUT_S)
        assert info.value.exitcode == 3
        with pytest.raises(Odd, match="odd one"):
            raised.result(timeout=TIMEOUT_S)


def test_resource_specification_places_tasks_on_an_existing_dispatcher(cluster, tmp_path: Path):
    cluster.start_dispatcher()
    cluster.start_executor("small", 4, "--cpus", "1")
    cluster.start_executor("big", 4, "--cpus", "4", "--tag", "gpu")
    executor = FalconetExecutor(address=cluster.client_address)
    with parsl.load(config(tmp_path, executor, garbage_collect=False)):
        wait_until(lambda: executor.connected_workers == 2, what="both executors registered")
        wide = [square(i, parsl_resource_specification={"cores": 2, "memory": 0, "disk": 0}) for i in range(8)]
        tagged = [square(i, parsl_resource_specification={"tags": ["gpu"]}) for i in range(4)]
        for f in wide + tagged:
            f.result(timeout=TIMEOUT_S)
        assert {exec_future(f).info.executor for f in wide + tagged} == {"big"}

        with pytest.raises(InvalidResourceSpecification) as info:
            square(1, parsl_resource_specification={"cores": 1, "gpus": 1}).result(timeout=TIMEOUT_S)
        assert info.value.invalid_keys == {"gpus"}
        with pytest.raises(InvalidResourceSpecification, match="cpus must be"):
            square(1, parsl_resource_specification={"cores": 0}).result(timeout=TIMEOUT_S)


def test_memory_and_running_time_become_needs_and_walltime(tmp_path: Path):
    with parsl.load(config(tmp_path, FalconetExecutor(slots=1))):
        too_big = square(2, parsl_resource_specification={"memory": 10**9})
        with pytest.raises(TaskError, match="MB of memory"):
            too_big.result(timeout=TIMEOUT_S)
        started = time.monotonic()
        slow = nap(30, parsl_resource_specification={"running_time_min": 0.01})  # 0.6 s
        with pytest.raises(TaskError, match="wall"):
            slow.result(timeout=TIMEOUT_S)
        assert time.monotonic() - started < 20


def _tree(pids: list[int]) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return procs


def test_shutdown_cancels_pending_tasks_and_stops_the_embedded_cluster(tmp_path: Path):
    executor = FalconetExecutor(slots=1)
    dfk = parsl.load(config(tmp_path, executor))
    try:
        cluster = executor.cluster
        processes = _tree([cluster.dispatcher.pid, *(p.pid for p in cluster.executors)])
        running = nap(120)
        waiting = [square(i) for i in range(5)]
        wait_until(lambda: executor.client.status()["tasks"].get("running", 0) == 1,
                   what="the first task running")
        processes = _tree([cluster.dispatcher.pid, *(p.pid for p in cluster.executors)])
        assert len(processes) >= 3  # dispatcher, executor, its slot
        started = time.monotonic()
    finally:
        dfk.cleanup()
    assert time.monotonic() - started < 10  # the running task was killed, not waited for
    for fut in [running, *waiting]:
        assert fut.done() and fut.exception(timeout=0) is not None
    assert executor.client is None and executor.cluster is None
    gone, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == [], f"falconet processes left after shutdown: {alive}"
    with pytest.raises(RuntimeError, match="not started"):
        executor.submit(print, {})


def test_monitoring_records_tasks_and_resources(tmp_path: Path):
    pytest.importorskip("sqlalchemy", reason="Parsl monitoring needs parsl[monitoring]")
    from parsl.monitoring import MonitoringHub
    from parsl.tests.test_monitoring.test_basic import row_counts_parametrized

    def fresh_config() -> Config:
        return Config(executors=[FalconetExecutor(slots=1)],
                      monitoring=MonitoringHub(resource_monitoring_interval=1))

    row_counts_parametrized(tmp_path, fresh_config)  # Parsl's own check of its monitoring tables
