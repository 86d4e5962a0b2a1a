"""Fault tests with real processes: SIGKILLed executors and dispatchers, torn journals.

Each run checks the two guarantees of docs/reliability.md: every accepted task ends with
exactly one result at its client (each future resolves once, with the right value), and
every task ran at least once (a marker file per run of a task).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from cluster_helpers import free_port, wait_until

from falconet import spawn
from falconet.dispatcher import journal

N_TASKS = 5_000


def square_marking(i: int, marks: str, sleep_s: float = 0.002) -> int:
    """i*i, leaving one file per run of this task (several if it ran more than once)."""
    with open(os.path.join(marks, f"{i}.{os.getpid()}.{time.monotonic_ns()}"), "w"):
        pass
    time.sleep(sleep_s)
    return i * i


def runs_per_task(marks: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for name in os.listdir(marks):
        i = int(name.split(".", 1)[0])
        counts[i] = counts.get(i, 0) + 1
    return counts


def check_every_task_once(futures, marks: Path) -> None:
    """One right result per task, and at least one run of each."""
    assert [f.result(timeout=120) for f in futures] == [i * i for i in range(N_TASKS)]
    runs = runs_per_task(marks)
    assert sorted(runs) == list(range(N_TASKS)), "some task never ran"
    print(f"{sum(runs.values())} runs for {N_TASKS} tasks; most runs of one task: {max(runs.values())}")


def test_sigkill_a_random_executor_every_second_loses_nothing(cluster, tmp_path):
    cluster.start_dispatcher()
    names = [f"ex-{i}" for i in range(3)]
    for name in names:
        cluster.start_executor(name, 2)
    marks = tmp_path / "marks"
    marks.mkdir()
    rng = random.Random(6)
    killed = 0
    with cluster.client() as client:
        futures = [client.submit_python(square_marking, (i, str(marks), 0.01), retries=20) for i in range(N_TASKS)]
        while cf.wait(futures, timeout=1.0).not_done:  # a kill each second
            victim = names.pop(rng.randrange(len(names)))
            cluster.kill(victim)
            killed += 1
            names.append(f"ex-{3 + killed}")
            cluster.start_executor(names[-1], 2)
        check_every_task_once(futures, marks)
        status = client.status()
        assert status["tasks"]["done"] == N_TASKS and status["submitted_total"] == N_TASKS
    assert killed >= 3, f"the run ended after {killed} kills; make the tasks longer"
    print(f"{killed} executors killed; {status['lost_executors']} declared lost")


def test_sigkill_the_journaling_dispatcher_twice_loses_nothing(cluster, tmp_path):
    cport, eport = free_port(), free_port()
    state = ("--state-dir", str(tmp_path / "state"))
    cluster.start_dispatcher(cport, eport, extra=state)
    for name in ("ex-a", "ex-b"):
        cluster.start_executor(name, 2)
    marks = tmp_path / "marks"
    marks.mkdir()
    with cluster.client(dispatcher_timeout_s=60) as client:
        futures = [client.submit_python(square_marking, (i, str(marks))) for i in range(N_TASKS)]
        for fraction in (0.3, 0.6):
            wait_until(lambda f=fraction: sum(x.done() for x in futures) >= f * N_TASKS,
                       timeout_s=120, what=f"{fraction:.0%} of the tasks done")
            cluster.dispatcher.send_signal(signal.SIGKILL)
            cluster.dispatcher.wait()
            cluster.start_dispatcher(cport, eport, extra=state)
        check_every_task_once(futures, marks)
        assert all(not f.exception() for f in futures)
        wait_until(lambda: client.status()["unacknowledged_results"] == 0, what="every result acknowledged")
        assert client.status()["durability"] == "journal"


def _dispatcher(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([*spawn.falconet(), "dispatcher", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


def test_a_torn_journal_tail_is_recovered_with_a_log_line(cluster, tmp_path):
    cport, eport = free_port(), free_port()
    state = tmp_path / "state"
    cluster.start_dispatcher(cport, eport, extra=("--state-dir", str(state)))
    with cluster.client() as client:
        futures = client.submit_commands([f"echo {i}" for i in range(20)])
        wait_until(lambda: client.status()["queued"] == 20, what="20 queued tasks")
        cluster.dispatcher.send_signal(signal.SIGKILL)
        cluster.dispatcher.wait()
        with open(state / "journal", "ab") as f:  # half a record, as a crash mid-write leaves it
            f.write(journal._RECORD.pack(1000, 0) + b"\x93\x01")
        cluster.start_dispatcher(cport, eport, extra=("--state-dir", str(state)))
        cluster.start_executor("ex", 2)
        assert [f.result(timeout=60).stdout for f in futures] == [f"{i}\n" for i in range(20)]
        recovered = client.status()["journal"]["recovered"]
    assert "incomplete or corrupt" in recovered
    wait_until(lambda: "crash mid-write" in (tmp_path / "dispatcher.log").read_text(),
               what="the recovery in the dispatcher's log")


def test_a_journal_of_another_format_is_refused_in_one_line(tmp_path):
    (tmp_path / "journal").write_bytes(journal._HEADER.pack(journal.MAGIC, journal.FORMAT_VERSION + 6))
    proc = _dispatcher(["--state-dir", str(tmp_path)])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--state-dir" in lines[0], lines


def test_status_says_when_the_dispatcher_keeps_no_journal(cluster):
    cluster.start_dispatcher()
    run = subprocess.run([*spawn.falconet(), "status", "--dispatcher", cluster.client_address],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "state: in memory" in run.stdout, run.stdout + run.stderr
