"""`falconet run` says why its bar does not move: unschedulable tasks, no executors yet."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from cluster_helpers import wait_until

from falconet import spawn


def _read_until(proc: subprocess.Popen, wanted: str, timeout_s: float = 30.0) -> list[str]:
    """Lines of proc's stderr up to the first that contains wanted (the test fails without it)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        if not line:
            break
        seen.append(line)
        if wanted in line:
            return seen
    raise AssertionError(f"no line with {wanted!r} on stderr; saw {seen}")


@contextlib.contextmanager
def _run_on(cluster, tasks: Path) -> Iterator[subprocess.Popen]:
    """`falconet run TASKS` on the cluster's dispatcher, its stderr a text pipe; killed if left running."""
    run = subprocess.Popen([*spawn.falconet(), "run", str(tasks), "--dispatcher", cluster.client_address],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        yield run
    finally:
        if run.poll() is None:
            run.kill()
        run.communicate()


def test_run_shows_unschedulable_tasks_and_why(cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_executor("ex-1", 1)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"ex-1"}, what="the executor")
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo fine\n#falconet where=cloud\necho never\necho never\n")
    with _run_on(cluster, tasks) as run:
        lines = _read_until(run, "unschedulable:")
        assert "2 tasks can never run here" in lines[-1] and "where=cloud" in lines[-1], lines
        run.send_signal(signal.SIGTERM)  # they would wait for a cloud executor for ever
        _, rest = run.communicate(timeout=30)
        assert run.returncode == 143 and "1 done" in rest


def test_an_embedded_run_fails_unschedulable_tasks_at_once(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo fine\n#falconet where=cloud\necho never\n")
    results = tmp_path / "results.jsonl"
    # Well under the 30 s after which such tasks used to fail.
    run = subprocess.run([*spawn.falconet(), "run", str(tasks), "--local", "1", "--results", str(results)],
                         capture_output=True, text=True, timeout=25, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    failed = [r for r in map(json.loads, results.read_text().splitlines()) if r["state"] == "failed"]
    assert [r["command"] for r in failed] == ["echo never"]
    assert failed[0]["reason"].startswith("unschedulable: needs cpus=1 where=cloud: no executor can run it")
    assert "2 tasks: 1 done, 1 failed" in run.stderr


def test_provisioned_run_says_it_starts_executors_and_starts_one_before_the_interval(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo hi\n")
    # With a 60 s interval between rounds, the first executor still comes at once: a
    # provisioner with an empty fleet looks again within a fraction of a second.
    run = subprocess.run([*spawn.falconet(), "run", str(tasks), "--provision", "local"],
                         capture_output=True, text=True, timeout=45, cwd=tmp_path,
                         env={**os.environ, "FALCONET_PROVISIONER_INTERVAL": "60"})
    assert run.returncode == 0, run.stderr
    assert "starting executors: the provisioner adds them while work waits" in run.stderr
    assert "1 tasks: 1 done, 0 failed" in run.stderr


def test_run_on_a_dispatcher_without_executors_says_so_and_goes_on_when_one_joins(cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo one\necho two\n")
    with _run_on(cluster, tasks) as run:
        _read_until(run, "waiting for executors: none is connected to the dispatcher yet")
        cluster.start_executor("late", 1)
        _, rest = run.communicate(timeout=60)
        assert run.returncode == 0 and "2 tasks: 2 done, 0 failed" in rest, rest
