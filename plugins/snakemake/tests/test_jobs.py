"""The mapping from a Snakemake job to a falconet task, and from a future to an outcome."""

from __future__ import annotations

import concurrent.futures as cf

from snakemake_executor_plugin_falconet import jobs

from falconet import CommandResult, TaskError


def test_threads_mem_runtime_and_tags_map_to_task_options() -> None:
    options = jobs.task_options(4, {"mem_mb": 2000, "runtime": 30, "falconet_tags": "gpu, rack=b7"})
    assert options == {"cpus": 4, "memory": 2000, "walltime_s": 1800.0, "tags": ["gpu", "rack=b7"]}


def test_a_plain_job_asks_for_one_cpu_only() -> None:
    assert jobs.task_options(1, {"tmpdir": "/tmp", "disk_mb": 1000}) == {"cpus": 1}


def test_threads_are_capped_at_the_embedded_clusters_cpus() -> None:
    assert jobs.task_options(8, {}, max_cpus=2) == {"cpus": 2}
    assert jobs.task_options(8, {}) == {"cpus": 8}  # a dispatcher: its executors decide


def test_values_that_are_not_numbers_yet_are_ignored() -> None:
    # Snakemake shows resources it has not evaluated as placeholders; fractions round up.
    assert jobs.task_options(1, {"mem_mb": "<TBD>", "runtime": 0, "falconet_tags": ""}) == {"cpus": 1}
    assert jobs.task_options(1, {"mem_mb": 99.2, "runtime": 0.5}) == {"cpus": 1, "memory": 100, "walltime_s": 30.0}


def test_outcome_of_a_command_that_succeeded() -> None:
    fut: cf.Future = cf.Future()
    fut.set_result(CommandResult(0, "out", "", executor="ex-1"))
    assert jobs.outcome(fut) == jobs.Outcome(True)


def test_outcome_of_a_failed_command_has_the_end_of_stderr_and_the_whole_output() -> None:
    fut: cf.Future = cf.Future()
    stderr = "".join(f"line {i}\n" for i in range(100))
    fut.set_result(CommandResult(1, "the stdout", stderr, executor="ex-1", reason="exit code 1"))
    result = jobs.outcome(fut)
    assert not result.ok
    assert result.message.startswith("falconet: the job failed on executor ex-1 (exit code 1)")
    assert "line 99" in result.message and "line 79" not in result.message
    assert "the stdout" in result.log and "line 0\n" in result.log


def test_outcome_of_a_task_that_could_not_run_or_was_cancelled() -> None:
    lost: cf.Future = cf.Future()
    lost.set_exception(TaskError("executor lost 4 times"))
    assert "could not run the job: executor lost 4 times" in jobs.outcome(lost).message
    cancelled: cf.Future = cf.Future()
    cancelled.cancel()
    assert "cancelled" in jobs.outcome(cancelled).message
