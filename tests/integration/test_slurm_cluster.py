"""The `slurm` fixture is a real Slurm: jobs run, squeue sees them, scancel ends them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cluster_helpers import wait_until

JOB_START_TIMEOUT_S = 20.0


def test_the_node_is_idle_in_every_partition(slurm):
    def rows() -> set:
        out = slurm.run("sinfo", "--noheader", "--format", "%R %t %N").stdout.split("\n")
        return {tuple(line.split()) for line in out if line.strip()}

    want = {(partition, "idle", slurm.node) for partition in slurm.partitions}
    # a job of an earlier test may still be completing on it
    wait_until(lambda: rows() == want, JOB_START_TIMEOUT_S, f"the node idle in every partition, not {rows()}")


@pytest.mark.parametrize("partition", ["debug", "short"])
def test_a_batch_job_runs_and_writes_its_file(slurm, tmp_path: Path, partition: str):
    target = tmp_path / "hi.txt"
    slurm.sbatch(f"--partition={partition}", f"--chdir={tmp_path}", "--output=/dev/null",
                 "--wrap", f"echo hi > {target}")
    wait_until(lambda: target.exists() and target.read_text() == "hi\n", JOB_START_TIMEOUT_S,
               f"the job in {partition} to write {target}")


def test_squeue_lists_a_running_job_and_scancel_removes_it(slurm):
    job = slurm.sbatch("--output=/dev/null", "--job-name=sleeper", "--wrap", "sleep 300")
    wait_until(lambda: slurm.job_state(job) == "RUNNING", JOB_START_TIMEOUT_S, f"job {job} running")
    listed = slurm.run("squeue", "--noheader", "--format", "%i %j %T").stdout.split("\n")
    assert f"{job} sleeper RUNNING" in listed

    slurm.run("scancel", job)
    wait_until(lambda: slurm.job_state(job) in ("", "CANCELLED"), JOB_START_TIMEOUT_S,
               f"job {job} gone from squeue after scancel")


def test_a_job_in_an_unknown_partition_is_refused(slurm):
    with pytest.raises(subprocess.CalledProcessError) as refused:
        slurm.sbatch("--partition=nosuch", "--output=/dev/null", "--wrap", "true")
    assert "invalid partition" in refused.value.stderr.lower()


def test_two_jobs_run_at_once(slurm):
    if slurm.cpus < 2:
        pytest.skip("one CPU: Slurm runs one single-CPU job at a time")
    jobs = [slurm.sbatch("--output=/dev/null", "--cpus-per-task=1", "--wrap", "sleep 300")
            for _ in range(2)]
    try:
        wait_until(lambda: all(slurm.job_state(job) == "RUNNING" for job in jobs),
                   JOB_START_TIMEOUT_S, f"jobs {jobs} running together")
    finally:
        slurm.run("scancel", *jobs)


def test_a_time_limit_under_a_minute_is_rounded_up_to_one(slurm):
    # Slurm keeps limits in whole minutes, and slurmctld checks them every 30 s (a
    # compile-time constant), so a job outlives --time=0:20 by 40 to 70 s: a walltime test
    # must allow for about 90 s.
    job = slurm.sbatch("--output=/dev/null", "--time=0:20", "--hold", "--wrap", "true")
    try:
        limit = slurm.run("squeue", "--noheader", "--jobs", job, "--format", "%l").stdout.strip()
        assert limit == "1:00"
    finally:
        slurm.run("scancel", job)
