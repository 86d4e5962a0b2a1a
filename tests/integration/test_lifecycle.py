"""However an embedded run ends (Ctrl-C, SIGTERM, a closed terminal, SIGKILL), nothing is left running.

Each test starts the real `falconet run` (or a script using `falconet.local()`), waits until
its commands run, stops it, and checks that every process it had started is gone within a
few seconds and that no log folder is left behind on a clean stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from cluster_helpers import wait_until

from falconet import spawn

MARK = "301"  # `sleep 301`: the task commands, told apart from anything else on the machine
GONE_WITHIN_S = 10.0


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _sleeping(procs: list[psutil.Process]) -> int:
    """How many of procs are our task commands."""
    n = 0
    for proc in procs:
        try:
            n += proc.cmdline() == ["sleep", MARK]
        except psutil.Error:
            pass
    return n


def _start(argv: list[str], tmp_path: Path) -> subprocess.Popen:
    """Start argv with its own temp dir (to see the log folders it leaves) and session."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.Popen(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _family_when_running(proc: subprocess.Popen, commands: int) -> list[psutil.Process]:
    """Every process under proc, once `commands` task commands are running."""
    wait_until(lambda: _sleeping(_descendants(proc.pid)) >= commands or proc.poll() is not None,
               timeout_s=60, what=f"{commands} task commands running")
    assert proc.poll() is None, proc.communicate()
    family = _descendants(proc.pid)
    assert len(family) >= 2 + commands  # a dispatcher, an executor, its slots, the commands
    return family


def _assert_all_gone(family: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(family, timeout=GONE_WITHIN_S)
    left = []
    for p in alive:
        try:
            left.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    for p in alive:  # do not leak them into the rest of the suite
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"still running {GONE_WITHIN_S}s later: {left}"


def _task_file(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"sleep {MARK}\n" * 6)
    return tasks


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_run_local_stops_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    run = _start([*spawn.falconet(), "run", str(_task_file(tmp_path)), "--local", "2", "-q"], tmp_path)
    family = _family_when_running(run, commands=2)
    run.send_signal(sig)
    _, err = run.communicate(timeout=30)
    assert run.returncode == 128 + sig, err
    assert "interrupted: 6 tasks: 0 done, 0 failed" in err
    _assert_all_gone(family)
    assert not list(tmp_path.glob("falconet-local-*")), "the log folder of a clean stop is removed"


@pytest.mark.parametrize("mode", [["--local", "2"], ["--provision", "local"]])
def test_a_killed_run_leaves_nothing_running(tmp_path: Path, mode: list[str]) -> None:
    argv = [*spawn.falconet(), "run", str(_task_file(tmp_path)), *mode, "-q"]
    run = _start(argv, tmp_path)
    family = _family_when_running(run, commands=1)
    run.kill()
    run.communicate(timeout=30)
    _assert_all_gone(family)


SCRIPT = f"""
import sys, time
import falconet

with falconet.local(slots=2) as client:
    futures = [client.submit_command("sleep {MARK}") for _ in range(4)]
    print("submitted", flush=True)
    time.sleep(600)
"""


def test_a_killed_python_script_leaves_nothing_running(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    script = _start([sys.executable, "script.py"], tmp_path)
    family = _family_when_running(script, commands=2)
    script.kill()
    script.communicate(timeout=30)
    _assert_all_gone(family)


def test_a_finished_run_removes_its_log_folder(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("true\n" * 3)
    run = _start([*spawn.falconet(), "run", str(tasks), "--local", "1", "-q"], tmp_path)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert not list(tmp_path.glob("falconet-*")), list(tmp_path.iterdir())
