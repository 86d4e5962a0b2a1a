"""The Snakemake executor: each job is one falconet command task, and its future says how
it ended.

Like every remote executor, a job runs as ``python -m snakemake --target-jobs ...`` (the
line ``format_job_exec`` builds) in the workflow's directory, on a shared file system.
Snakemake asks ``check_active_jobs`` about the jobs it submitted; the answer comes from
the futures, which the client's I/O thread completes, so nothing is polled: between
checks the status thread sleeps until some future completes, not for a fixed period.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import threading
from collections.abc import AsyncGenerator

from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.logging import LoggerExecutorInterface
from snakemake_interface_executor_plugins.workflow import WorkflowExecutorInterface

import falconet
from falconet.local import AT_ONCE_S, LocalCluster
from snakemake_executor_plugin_falconet import jobs

LOG_DIR = os.path.join(".snakemake", "falconet_logs")  #: failed jobs' output, one file per attempt
SAFETY_WAKE_S = 5.0  #: the status thread looks again after this long even if no future woke it
CANCEL_STOP_S = 2.0  #: on cancel, running jobs get this long before the embedded cluster is killed
DRAIN_S = 10.0  #: at the end of a run, the embedded cluster's time to leave before it is killed


class Executor(RemoteExecutor):
    """Runs Snakemake jobs as falconet command tasks (an embedded cluster, or a dispatcher)."""

    def __init__(self, workflow: WorkflowExecutorInterface, logger: LoggerExecutorInterface):
        # Before the base class starts the status thread, which uses them at once.
        self._changed = threading.Event()  # set by each future as it completes
        self._cancelling = False
        super().__init__(workflow, logger)

    def __post_init__(self) -> None:
        settings = self.workflow.executor_settings
        self._cluster: LocalCluster | None = None
        self._max_cpus: int | None = None
        address = settings.dispatcher or os.environ.get("FALCONET_DISPATCHER")
        if not address:
            address = self._start_cluster(settings.slots or os.cpu_count() or 1)
        try:
            self._client = falconet.Client(address, name=f"snakemake-{os.getpid()}",
                                           dispatcher_key=settings.dispatcher_key, key=settings.key)
        except BaseException:
            self._stop_cluster(CANCEL_STOP_S)
            raise
        self.logger.info(f"falconet: jobs go to the dispatcher at {self._client.address}"
                         + (f" (an embedded cluster of {self._max_cpus} slots)" if self._cluster else ""))

    def _start_cluster(self, slots: int) -> str:
        """Start an embedded dispatcher and one executor whose cpus are its slots."""
        # One cpu per slot, so a job of N threads takes N slots; an unschedulable task fails
        # at once (no other executor will join), with the dispatcher's reason.
        self._cluster = LocalCluster(slots, executors=0, fail_unschedulable_s=AT_ONCE_S)
        try:
            self._cluster.add_executor(extra=["--cpus", str(slots)])
        except BaseException:
            self._stop_cluster(CANCEL_STOP_S)
            raise
        self._max_cpus = slots
        return self._cluster.client_address

    # ------------------------------------------------------------ submitting

    def run_job(self, job: JobExecutorInterface) -> None:
        """Submit the job as one command task, in the workflow's directory."""
        options = jobs.task_options(job.threads, job.resources, self._max_cpus)
        fut = self._client.submit_command(self.format_job_exec(job), cwd=os.getcwd(), **options)
        self.report_job_submission(SubmittedJobInfo(job, external_jobid=f"falconet-{fut.seq}",
                                                    aux={"future": fut}))
        # After the job is listed as active: a future that is already done wakes the
        # status thread now, and finds the job there.
        fut.add_done_callback(self._wake)

    def _wake(self, _fut: cf.Future | None = None) -> None:
        self._changed.set()

    # ------------------------------------------------------------ status

    async def check_active_jobs(
        self, active_jobs: list[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        """Report the jobs whose futures are done; yield the others (still active)."""
        self._changed.clear()  # a future completing from here on wakes the next sleep()
        for job_info in active_jobs:
            fut: cf.Future = job_info.aux["future"]
            if not fut.done():
                yield job_info
                continue
            result = jobs.outcome(fut)
            if result.ok:
                self.report_job_success(job_info)
            else:
                self._report_failure(job_info, result)

    def _report_failure(self, job_info: SubmittedJobInfo, result: jobs.Outcome) -> None:
        """Tell Snakemake, with the end of stderr in the message and the whole output in a log."""
        aux_logs = []
        if result.log:
            name = self.get_jobname(job_info.job).removesuffix(".sh")
            path = os.path.join(LOG_DIR, f"{name}.attempt{job_info.job.attempt}.log")
            try:
                os.makedirs(LOG_DIR, exist_ok=True)
                with open(path, "w") as fh:
                    fh.write(result.log)
                aux_logs.append(os.path.abspath(path))
            except OSError as exc:
                self.logger.warning(f"falconet: could not write the job's log {path}: {exc}")
        self.report_job_error(job_info, msg=result.message, aux_logs=aux_logs)

    async def sleep(self) -> None:
        """Until a future completes (or, as a safety net, the status-check interval passes)."""
        if not self.wait:  # shutdown() set this before it woke us: it may have woken us too early
            return
        interval_s = self.workflow.remote_execution_settings.seconds_between_status_checks
        await asyncio.to_thread(self._changed.wait, interval_s or SAFETY_WAKE_S)

    # ------------------------------------------------------------ stopping

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        """Cancel the jobs' futures: falconet drops those not started yet."""
        for job_info in active_jobs:
            job_info.aux["future"].cancel()
        self._cancelling = True

    def shutdown(self) -> None:
        """Stop the status thread, close the client, and stop an embedded cluster."""
        with self.lock:
            self.wait = False
        self._wake()  # the status thread is asleep until something wakes it
        super().shutdown()
        # Whatever has no result now, Snakemake no longer waits for: the dispatcher drops it.
        self._client.close(cancel=True, wait=False)
        self._stop_cluster(CANCEL_STOP_S if self._cancelling else DRAIN_S)

    def _stop_cluster(self, timeout_s: float) -> None:
        """Drain the embedded executor (running jobs get timeout_s, then are killed)."""
        if self._cluster is not None:
            self._cluster.stop(timeout_s=timeout_s)
            self._cluster = None
