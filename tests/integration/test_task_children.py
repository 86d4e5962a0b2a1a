"""Tasks that leave processes behind, and outputs too large to send, with real processes.

A command ends when its main process exits; what it started (its group, its session, and
on Linux whatever escaped them with setsid) is killed then.  A task queued behind a long
one in a slot is handed back to run on a free slot.  A Python value larger than the
dispatcher's --max-output-bytes fails in the slot, before it is copied out.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest
from cluster_helpers import wait_until

from falconet.errors import TaskError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process containment")

MAX_OUTPUT = 64 << 20  # the dispatcher's default --max-output-bytes


def sleeps(seconds: str) -> list[psutil.Process]:
    """The live `sleep SECONDS` processes (a distinct number per test names its leftovers)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["cmdline"] == ["sleep", seconds] and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture
def leftovers():
    """Kill, after the test, any `sleep N` it names that is still alive (a failed test's)."""
    names: list[str] = []
    yield names.append
    for seconds in names:
        for proc in sleeps(seconds):
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass


def start(cluster, slots: int = 2) -> None:
    cluster.start_dispatcher()
    cluster.start_executor("ex-1", slots)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client), what="registration")


def warm_up(client) -> None:
    """Tiny tasks, so the executor's mean task time is short and it pipelines chunks."""
    for f in client.submit_commands(["true"] * 200):
        assert f.result(timeout=60).ok


def test_a_background_child_does_not_hold_its_task_or_its_slot(cluster, leftovers):
    leftovers("301")
    start(cluster)
    with cluster.client() as client:
        warm_up(client)
        t0 = time.monotonic()
        held = client.submit_command("sh -c 'sleep 301 & echo started'")
        after = [client.submit_command(f"echo {i}") for i in range(20)]
        res = held.result(timeout=30)
        assert res.ok and res.stdout == "started\n"
        assert [f.result(timeout=30).stdout for f in after] == [f"{i}\n" for i in range(20)]
        assert time.monotonic() - t0 < 10, "a task waited for the child of another"
    wait_until(lambda: not sleeps("301"), timeout_s=10, what="the background sleep 301 to be killed")


def test_a_child_with_its_own_streams_is_killed_when_its_task_ends(cluster, leftovers):
    leftovers("302")
    start(cluster)
    with cluster.client() as client:
        assert client.submit_command("sh -c 'sleep 302 >/dev/null 2>&1 &'").result(timeout=30).ok
    wait_until(lambda: not sleeps("302"), timeout_s=10, what="the detached sleep 302 to be killed")


def test_a_setsid_escapee_is_killed_and_logged(cluster, leftovers):
    """Contained, not only reported: the slot is a subreaper while a command runs."""
    leftovers("303")
    start(cluster)
    with cluster.client() as client:
        res = client.submit_command("sh -c 'setsid sleep 303 & echo out'").result(timeout=30)
        assert res.ok and res.stdout == "out\n"
    wait_until(lambda: not sleeps("303"), timeout_s=10, what="the setsid sleep 303 to be killed")
    wait_until(lambda: "left behind outside its process group" in cluster.log("ex-1")
               and "(sleep)" in cluster.log("ex-1"), timeout_s=10, what="the escapee in the executor's log")


def test_a_walltime_kill_takes_the_group_and_the_escapees(cluster, leftovers):
    leftovers("304")
    leftovers("305")
    start(cluster)
    with cluster.client() as client:
        t0 = time.monotonic()
        fut = client.submit_command("sh -c 'sleep 304 & setsid sleep 305 & sleep 306'", walltime_s=1)
        res = fut.result(timeout=30)
        assert not res.ok and "wall time of 1s exceeded" in res.reason
        assert time.monotonic() - t0 < 5, "the wall-time kill waited for the escapee's pipe"
    wait_until(lambda: not sleeps("304") and not sleeps("305") and not sleeps("306"), timeout_s=10,
               what="every sleep of the killed task to be gone")


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def noop(i: int) -> int:
    return i


@pytest.mark.parametrize("kind", ["python", "command"])
def test_no_task_waits_behind_a_long_one_while_a_slot_is_free(cluster, leftovers, kind):
    """Tiny tasks pipeline to a slot about to finish its last one; when that one runs long
    instead, the slot hands back what it had not started."""
    leftovers("40")
    start(cluster)
    with cluster.client() as client:
        warm_up(client)
        assert list(client.map(noop, range(2000))) == list(range(2000))
        long = client.submit(nap, 40) if kind == "python" else client.submit_command("sleep 40")
        t0 = time.monotonic()
        tiny = [client.submit(noop, i) for i in range(3000)]
        assert [f.result(timeout=30) for f in tiny] == list(range(3000))
        took = time.monotonic() - t0
        assert took < 10, f"tiny tasks took {took:.1f}s: some waited behind the long one"
        assert not long.done()
    assert "handed back" in cluster.log("ex-1")  # the case arose, and was met


def peak_rss(pid: int) -> int:
    """A process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def big_value() -> bytes:
    return os.urandom(1) * 300_000_000


def test_a_value_over_the_output_limit_fails_fast_in_the_slot(cluster):
    start(cluster)
    executor = psutil.Process(cluster.procs["ex-1"].pid)
    before = peak_rss(executor.pid)
    with cluster.client() as client:
        t0 = time.monotonic()
        with pytest.raises(TaskError) as err:
            client.submit(big_value).result(timeout=60)
        took = time.monotonic() - t0
        assert client.submit(len, b"small").result(timeout=30) == 5  # the slot lives on
    reason = str(err.value)
    assert f"output of 300000000 bytes is more than the dispatcher's limit of {MAX_OUTPUT} (--max-output-bytes)" \
        in reason, reason
    assert took < 20, f"took {took:.1f}s"
    grew = peak_rss(executor.pid) - before
    assert grew < 100 << 20, f"the executor's peak memory grew by {grew >> 20} MiB"
    assert executor.memory_info().rss < 300 << 20
