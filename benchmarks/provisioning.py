"""Scale-out from an empty fleet: time to the first and the last executor, and the backend
calls each policy makes on the way (``falconet bench --only provisioning``).

On EC2, the cloud is moto's EC2 API on loopback and :class:`~falconet.benchmarks.ec2sim.Hypervisor`,
which boots an executor process for each running instance.  On Slurm, a real single-node
Slurm (:mod:`falconet.benchmarks.slurmsim`, as root with slurm-wlm and munge installed) runs
the pilot jobs, its node declared with one cpu per executor.  The provisioner and the
dispatcher are the real programs.  Times include starting a Python executor per node on
this machine, so they say more about the policies' shapes than about EC2's boot time or a
busy cluster's queue.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from typing import Any

from falconet import spawn
from falconet.benchmarks import slurmsim
from falconet.benchmarks.ec2sim import Hypervisor, MotoEc2
from falconet.benchmarks.slurmsim import SlurmCluster
from falconet.client import Client
from falconet.local import LocalCluster
from falconet.provisioner.policy import Strategy

TASK_S = 600  #: tasks outlast the slowest scale-out; they are killed with their machines at the end


def scale_out(moto: MotoEc2, policy: str, executors: int, interval_s: float = 0.5,
              timeout_s: float = 300.0, stop_grace_s: float = 5.0) -> dict[str, Any]:
    """One scale-out from 0 to `executors` one-slot executors under `policy`, on the
    simulated EC2.

    Stopping the provisioner afterwards takes about stop_grace_s: its executors keep running
    their `sleep` tasks (a cancel does not stop a started task), so the drain waits it out."""
    cluster = f"bench-{policy}-{uuid.uuid4().hex[:6]}"
    log_dir = tempfile.mkdtemp(prefix=f"falconet-{cluster}-")
    with Hypervisor(moto, cluster, log_dir) as _hv:
        try:
            result = _scale_out(["--backend", "ec2", "--ec2-endpoint-url", moto.url, "--region", "us-east-1",
                                 "--ami", moto.image_id, "--instance-types", "c5.large"],
                                moto.env(), cluster, log_dir, policy, executors, interval_s, timeout_s,
                                stop_grace_s)
            result["run_instances"] = result["api_calls"].get("RunInstances", 0)
        finally:
            left = moto.instances(cluster, states=("pending", "running"))
            if left:  # never leak, even from a benchmark
                moto.ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in left])
    shutil.rmtree(log_dir, ignore_errors=True)  # kept, for a look, only when the run failed
    return result


def slurm_scale_out(slurm: SlurmCluster, policy: str, executors: int, interval_s: float = 0.5,
                    timeout_s: float = 300.0, stop_grace_s: float = 5.0) -> dict[str, Any]:
    """The same scale-out with pilot jobs on a real single-node Slurm (one cpu each)."""
    cluster = f"bench-{policy}-{uuid.uuid4().hex[:6]}"
    log_dir = tempfile.mkdtemp(prefix=f"falconet-{cluster}-")
    try:
        result = _scale_out(["--backend", "slurm", "--cpus-per-job", "1", "--job-time", "30",
                             "--job-log-dir", os.path.join(log_dir, "jobs")],
                            slurm.env, cluster, log_dir, policy, executors, interval_s, timeout_s, stop_grace_s)
        result["sbatch"] = result["api_calls"].get("sbatch", 0)
    finally:  # never leak a job, even from a benchmark
        slurm.run("scancel", "-n", f"falconet-{cluster}", check=False)
    shutil.rmtree(log_dir, ignore_errors=True)
    return result


def _scale_out(backend_args: list[str], env: dict, cluster: str, log_dir: str, policy: str, executors: int,
               interval_s: float, timeout_s: float, stop_grace_s: float) -> dict[str, Any]:
    """A dispatcher, a provisioner of this backend, and 2 x executors long tasks: the times to
    the first and to the last executor registered, and the backend calls made."""
    with LocalCluster(executors=0, log_dir=log_dir) as local:
        log = open(os.path.join(log_dir, "provisioner.log"), "ab")  # noqa: SIM115 - the child's
        prov = subprocess.Popen(
            spawn.falconet("provisioner", "--dispatcher", local.client_address, *backend_args,
                           "--cluster", cluster, "--slots", "1", "--max-executors", str(executors),
                           "--policy", policy, "--interval", str(interval_s), "--idle-release", "600",
                           "--stop-grace", str(stop_grace_s)),
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        client = Client(local.client_address, name="bench-provisioning")
        try:
            fleet = _wait(client, lambda f: f.get("rounds", 0) >= 1, timeout_s)
            t0 = time.monotonic()
            # two per executor: one running, one held as its prefetch, so the queue wants
            # more executors until every one of them is there
            client.submit_commands([f"sleep {TASK_S}"] * (executors * 2))
            first = _wait(client, lambda f: f.get("registered", 0) >= 1, timeout_s)
            t_first = time.monotonic() - t0
            fleet = _wait(client, lambda f: f.get("registered", 0) >= executors, timeout_s)
            t_all = time.monotonic() - t0
            calls = fleet["api_calls"]
            launches = [r for d in fleet["decisions"] for r in d["reasons"] if r.startswith("launch ")]
            return {"policy": policy, "executors": executors, "first_registered_s": t_first,
                    "all_registered_s": t_all, "api_calls": calls, "total_api_calls": sum(calls.values()),
                    "rounds": fleet["rounds"], "launches": launches, "first_round": first["rounds"]}
        finally:
            client.close(cancel=True, wait=False)  # the sleeps die with their machines
            prov.send_signal(signal.SIGTERM)
            try:
                prov.wait(60)
            except subprocess.TimeoutExpired:
                spawn.signal_group(prov.pid, signal.SIGKILL)
                prov.wait()


def _wait(client: Client, done: Any, timeout_s: float) -> dict:
    """Poll the fleet report until done(fleet); the benchmark's own clock is the dispatcher's."""
    deadline = time.monotonic() + timeout_s
    while True:
        fleet = client.status(detail=True).get("fleet") or {}
        if done(fleet):
            return fleet
        if time.monotonic() > deadline:
            raise TimeoutError(f"fleet did not get there in {timeout_s:g}s: {fleet.get('counts')}")
        time.sleep(0.05)


def run(executors: int, repeat: int = 1, policies: tuple[str, ...] = tuple(s.value for s in Strategy),
        stop_grace_s: float = 5.0) -> list[dict]:
    """`repeat` scale-outs per policy on one simulated cloud, then on one local Slurm; the
    run with the median time to the whole fleet stands for the policy, with every run's
    times kept beside it.  Slurm rows say why they were not run where Slurm cannot be."""
    out = []
    with MotoEc2() as moto:
        for policy in policies:
            out.append(_median([scale_out(moto, policy, executors, stop_grace_s=stop_grace_s)
                                for _ in range(repeat)], backend="ec2"))
    why = slurmsim.unavailable()
    if why:
        return out + [{"backend": "slurm", "policy": policy, "executors": executors, "skipped": why}
                      for policy in policies]
    with SlurmCluster(cpus=executors) as slurm:
        for policy in policies:
            out.append(_median([slurm_scale_out(slurm, policy, executors, stop_grace_s=stop_grace_s)
                                for _ in range(repeat)], backend="slurm"))
    return out


def _median(runs: list[dict], backend: str) -> dict:
    runs = sorted(runs, key=lambda r: r["all_registered_s"])
    median = {"backend": backend, **runs[len(runs) // 2]}
    median["runs"] = [{k: r[k] for k in ("first_registered_s", "all_registered_s", "total_api_calls")}
                      for r in runs]
    return median
