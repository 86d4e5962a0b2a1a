"""Real workflows through the snakemake command line: a few hundred jobs with a failing
rule and --retries, and Ctrl-C in the middle of running jobs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
from conftest import HERE, run_snakemake, snakemake_cmd, wait_until

N = 60  #: samples: 4 jobs each (generate, square, total, flaky)
JOBS = 4 * N + 3  #: and summary, broken, all
BROKEN = 7
RETRIES = 1


def copy_workflow(name: str, tmp_path: Path) -> Path:
    workdir = tmp_path / name
    shutil.copytree(HERE / "workflows" / name, workdir)
    return workdir


def test_a_few_hundred_jobs_with_a_failing_rule_and_retries(tmp_path: Path) -> None:
    workdir = copy_workflow("farm", tmp_path)
    # Each job runs as its own `python -m snakemake` (about 2 s of CPU before the rule
    # starts), so most jobs are grouped, as one does with tiny jobs on any remote executor:
    # each sample's three jobs form a component, 30 components one falconet task.
    run = run_snakemake(workdir, "--executor", "falconet", "--jobs", "8", "--falconet-slots", "2",
                        "--retries", str(RETRIES), "--keep-going", "--config", f"samples={N}", f"broken={BROKEN}",
                        "--groups", "generate=sample", "square=sample", "total=sample", "flaky=flaky",
                        "--group-components", "sample=30", f"flaky={N}")
    log = run.stdout + run.stderr

    assert run.returncode == 1, log  # the broken rule failed the workflow
    assert f"{JOBS - 2} of {JOBS} steps (99%) done" in log, log  # all but broken and all
    # Every sample went through generate -> square -> total; the summary adds them up.
    totals = [sum(i * i for i in range(1, s + 2)) for s in range(N)]
    for s in range(N):
        assert (workdir / "totals" / f"{s}.txt").read_text().split() == [str(totals[s])]
    assert [int(x) for x in (workdir / "summary.txt").read_text().split()] == totals
    # The flaky group failed on its first attempt, and its retry (attempt 2) succeeded.
    assert all((workdir / "flaky" / f"{s}.txt").read_text().strip() == "2" for s in range(N)), log
    assert log.count("Error in group flaky") == 1, log
    logs = workdir / ".snakemake" / "falconet_logs"
    (flaky_log,) = logs.glob("snakejob.flaky_flaky.*.attempt1.log")
    assert re.search(r"flaky \d+: failing on attempt 1", flaky_log.read_text())
    # The broken rule ran 1 + RETRIES times, then its error reached Snakemake: the reason
    # and the end of its stderr, with the whole output in a log file per attempt.
    assert (workdir / "marks" / f"broken-{BROKEN}.txt").read_text().split() == ["1", "2"]
    assert not (workdir / "broken" / f"{BROKEN}.txt").exists()
    assert log.count("falconet: the job failed on executor") == 1 + RETRIES, log
    assert "(exit code 1); the end of its stderr:" in log, log
    assert f"broken {BROKEN}: the input is bad, attempt {1 + RETRIES}" in log
    broken_logs = sorted(logs.glob("snakejob.broken.*.log"))
    assert [p.name.rsplit(".", 2)[-2] for p in broken_logs] == ["attempt1", "attempt2"]
    assert f"broken {BROKEN}: the input is bad, attempt 1" in broken_logs[0].read_text()
    assert "Exiting because a job execution failed" in log


def test_ctrl_c_cancels_the_jobs_and_stops_the_embedded_cluster(tmp_path: Path) -> None:
    workdir = copy_workflow("hang", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FALCONET_", "SNAKEMAKE_FALCONET_"))}
    # Three jobs on two slots: two run (and hang), one waits in falconet's queue.
    proc = subprocess.Popen(snakemake_cmd("--executor", "falconet", "--jobs", "3", "--falconet-slots", "2",
                                          "--config", "jobs=3"),
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        started = workdir / "started"
        wait_until(lambda: started.is_dir() and len(os.listdir(started)) == 2, 120, "two jobs to start")
        family = psutil.Process(proc.pid).children(recursive=True)  # the cluster and the jobs
        assert any("sleep" in " ".join(p.cmdline()) for p in family if p.is_running())
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, out
    assert "Terminating processes on user request" in out, out
    # Nothing of the run is left: dispatcher, executor, slots, the jobs and their sleeps.
    wait_until(lambda: not [p for p in family if _alive(p)], 30, "the cluster and its jobs to end")
    assert len(os.listdir(workdir / "started")) == 2  # the third never ran
    assert not (workdir / "done").exists()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_tags_reach_the_dispatcher_and_a_job_no_executor_can_run_fails_with_the_reason(tmp_path: Path) -> None:
    workdir = copy_workflow("needs", tmp_path)
    run = run_snakemake(workdir, "--executor", "falconet", "--jobs", "2", "--falconet-slots", "2", "--keep-going")
    log = run.stdout + run.stderr
    assert run.returncode == 1, log
    assert (workdir / "cpu.txt").exists()  # site=local: every executor here has it
    assert not (workdir / "gpu.txt").exists()
    assert "Error in rule gpu" in log and "falconet could not run the job:" in log, log
    assert "gpu" in log.split("falconet could not run the job:")[1].splitlines()[0], log
