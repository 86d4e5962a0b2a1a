"""The provisioner's slurm backend against a real single-node Slurm (the `slurm` fixture):
pilot jobs submitted with sbatch, each running a real executor that pulls from a real
dispatcher.  Nothing is simulated; the node has os.cpu_count() cpus, pilots ask for one."""

from __future__ import annotations

import signal
import subprocess
import uuid

import pytest
from cluster_helpers import wait_until

import falconet
from falconet import spawn
from falconet.benchmarks.slurmsim import SlurmCluster, unavailable

PILOT = ("--backend", "slurm", "--cpus-per-job", "1", "--slots", "1", "--interval", "0.3",
         "--boot-timeout", "60", "--log-level", "debug")


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test(request):
    """A test that fails before its provisioner stops leaves pilots running: cancel them,
    so the next test (and test_slurm_cluster.py) finds the cluster empty."""
    yield
    for name in ("slurm", "slurm2"):
        if name in request.fixturenames:
            request.getfixturevalue(name).cancel_all()


def _fleet(client: falconet.Client) -> dict:
    return client.status(detail=True).get("fleet") or {}


def _jobs(slurm, cluster_name: str, states: str = "PENDING,RUNNING,CONFIGURING,COMPLETING") -> list[str]:
    """Job ids of this fleet squeue lists (any user's view: the name is the fleet's)."""
    out = slurm.run("squeue", "-h", "-n", f"falconet-{cluster_name}", "-t", states, "-o", "%i").stdout
    return out.split()


def _provisioner(cluster, slurm, name: str, *args: str) -> subprocess.Popen:
    return cluster._spawn(name, ["provisioner", "--dispatcher", cluster.client_address, *PILOT,
                                 "--job-log-dir", str(cluster.log_dir / "jobs"), *args], env=slurm.env)


def _reasons(client: falconet.Client) -> list[str]:
    return [r for d in _fleet(client).get("decisions", []) for r in d["reasons"]]


def test_pilots_grow_to_the_maximum_run_every_task_and_leave_when_idle(cluster, slurm):
    name = f"grow-{uuid.uuid4().hex[:6]}"
    cluster.start_dispatcher()
    prov = _provisioner(cluster, slurm, "provisioner", "--cluster", name, "--max-executors", "2",
                        "--policy", "all-at-once", "--idle-release", "1", "--job-time", "10")
    with cluster.client() as client:
        wait_until(lambda: _fleet(client).get("rounds", 0) >= 1, what="the provisioner's first report")
        assert _jobs(slurm, name) == []  # no work, no pilot
        futures = client.submit_commands(["sleep 0.2"] * 40)
        wait_until(lambda: len(cluster.registered(client)) == 2, timeout_s=60, what="two pilots' executors")
        jobs = _jobs(slurm, name)
        assert len(jobs) == 2 and cluster.registered(client) == {f"slurm-{j}" for j in jobs}
        shown = subprocess.run([*spawn.falconet(), "status", "--dispatcher", cluster.client_address],
                               capture_output=True, text=True, timeout=60)
        assert f"fleet {name} (slurm, all-at-once, 0-2 executors)" in shown.stdout, shown.stdout
        assert "JOB" in shown.stdout and "RUNNING on " in shown.stdout and " left" in shown.stdout
        assert all(f.result(timeout=120).ok for f in futures)
        assert {f.result().executor for f in futures} == {f"slurm-{j}" for j in jobs}
        # idle: released, drained, and their jobs end by themselves
        wait_until(lambda: not cluster.registered(client), timeout_s=60, what="idle pilots to be released")
        wait_until(lambda: not _jobs(slurm, name), timeout_s=60, what="the pilots' jobs to end")
        assert client.status()["lost_executors"] == 0  # they drained and said goodbye
        assert any(r.startswith("release slurm-") and "idle" in r for r in _reasons(client)), _reasons(client)
    prov.send_signal(signal.SIGTERM)
    assert prov.wait(60) == 0


def test_a_restarted_provisioner_adopts_its_pilots_and_stop_cancels_every_one(cluster, slurm):
    name = f"adopt-{uuid.uuid4().hex[:6]}"
    cluster.start_dispatcher()
    first = _provisioner(cluster, slurm, "first", "--cluster", name, "--min-executors", "2",
                         "--max-executors", "2", "--job-time", "10")
    with cluster.client() as client:
        wait_until(lambda: len(cluster.registered(client)) == 2, timeout_s=60, what="two pilots")
        before = sorted(_jobs(slurm, name))
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _provisioner(cluster, slurm, "second", "--cluster", name, "--min-executors", "2",
                              "--max-executors", "2", "--job-time", "10")
        wait_until(lambda: _fleet(client).get("rounds", 0) >= 3 and "adopted" in " ".join(_reasons(client)),
                   timeout_s=60, what="the second provisioner's rounds")
        assert sorted(_jobs(slurm, name)) == before  # adopted, not submitted again
        assert any(r.startswith("adopted 2 machines") for r in _reasons(client)), _reasons(client)
        assert client.submit(pow, 2, 10).result(timeout=60) == 1024
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
        wait_until(lambda: not _jobs(slurm, name), timeout_s=30, what="no job of the fleet left")
        wait_until(lambda: not cluster.registered(client), timeout_s=30, what="the executors to leave")


def test_a_pilot_cancelled_from_outside_loses_no_task(cluster, slurm):
    name = f"scancel-{uuid.uuid4().hex[:6]}"
    cluster.start_dispatcher()
    prov = _provisioner(cluster, slurm, "provisioner", "--cluster", name, "--max-executors", "1",
                        "--job-time", "10")
    with cluster.client() as client:
        futures = client.submit_commands(["sleep 0.3"] * 30)
        wait_until(lambda: len(cluster.registered(client)) == 1, timeout_s=60, what="the first pilot")
        (job,) = _jobs(slurm, name)
        wait_until(lambda: client.status()["tasks"].get("done", 0) >= 3, timeout_s=60, what="a few tasks done")
        slurm.run("scancel", job)  # SIGTERM to the executor: it drains within Slurm's KillWait
        results = [f.result(timeout=180) for f in futures]
        assert all(r.ok for r in results)
        assert len({r.executor for r in results}) >= 2  # a new pilot took over
        assert f"slurm-{job}" in {r.executor for r in results}
    prov.send_signal(signal.SIGTERM)
    assert prov.wait(60) == 0
    assert not _jobs(slurm, name)


def test_a_pilot_stops_taking_work_before_its_walltime_and_a_new_one_takes_over(cluster, slurm):
    """--job-time 1 (a minute, Slurm's least) with --end-margin 45: each executor stops
    taking work about 15 s into its job; the provisioner sees it going and launches the next
    pilot while work waits.  The job ends by itself, not by its time limit."""
    name = f"walltime-{uuid.uuid4().hex[:6]}"
    cluster.start_dispatcher()
    prov = _provisioner(cluster, slurm, "provisioner", "--cluster", name, "--max-executors", "1",
                        "--job-time", "1", "--end-margin", "45", "--idle-release", "60")
    with cluster.client() as client:
        futures = client.submit_commands(["sleep 0.5"] * 50, retries=0)  # a killed task would fail
        results = [f.result(timeout=240) for f in futures]
        assert all(r.ok for r in results)
        pilots = sorted({r.executor for r in results})
        assert len(pilots) >= 2, pilots
        assert client.status()["lost_executors"] == 0
        events = client.events(limit=5000)["events"]
        drained = {e["executor"] for e in events if e["event"] == "drained"}
        assert pilots[0] in drained  # it asked to leave (its walltime): not lost, not released
    prov.send_signal(signal.SIGTERM)
    assert prov.wait(60) == 0


def test_a_partition_slurm_does_not_have_is_one_clear_line(cluster, slurm):
    cluster.start_dispatcher()
    run = subprocess.run([*spawn.falconet(), "provisioner", "--dispatcher", cluster.client_address,
                          "--backend", "slurm", "--partition", "nope"],
                         capture_output=True, text=True, timeout=60, env=slurm.env)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "error: Slurm has no partition 'nope'; it has: debug, short (check --partition)"]


def test_run_a_task_file_on_slurm_pilots_configured_by_environment(slurm, tmp_path):
    """`falconet run --provision slurm`, its options from FALCONET_PROVISIONER_* variables."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"echo {i}\n" for i in range(20)))
    results = tmp_path / "out.jsonl"
    name = f"run-{uuid.uuid4().hex[:6]}"
    env = {**slurm.env, "FALCONET_PROVISIONER_CLUSTER": name, "FALCONET_PROVISIONER_INTERVAL": "0.3",
           "FALCONET_PROVISIONER_CPUS_PER_JOB": "1", "FALCONET_PROVISIONER_SLOTS": "1",
           "FALCONET_PROVISIONER_MAX_EXECUTORS": "2", "FALCONET_PROVISIONER_JOB_TIME": "10",
           "FALCONET_PROVISIONER_JOB_LOG_DIR": str(tmp_path / "jobs")}
    run = subprocess.run([*spawn.falconet(), "run", str(tasks), "--provision", "slurm", "--results",
                          str(results), "-q"], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr
    assert "20 done" in run.stderr
    lines = results.read_text().splitlines()
    assert len(lines) == 20 and all('"executor": "slurm-' in line for line in lines), lines[:2]
    assert not _jobs(slurm, name)  # the run's end stopped its pilots
    assert list((tmp_path / "jobs").glob("slurm-*.out"))  # the pilots' output, where it was asked


def test_python_api_provision_slurm(slurm, tmp_path, monkeypatch):
    for key in ("SLURM_CONF",):
        monkeypatch.setenv(key, slurm.env[key])
    name = f"api-{uuid.uuid4().hex[:6]}"
    with falconet.provision("slurm", cluster=name, interval=0.3, cpus_per_job=1, slots=1, max_executors=2,
                            job_time="10", job_log_dir=str(tmp_path / "jobs")) as client:
        assert list(client.map(abs, range(-20, 0))) == list(range(20, 0, -1))
        fleet = client.status(detail=True)["fleet"]
        assert fleet["backend"] == "slurm" and fleet["cluster"] == name
    assert not _jobs(slurm, name)


@pytest.fixture(scope="module")
def slurm2():
    """A real Slurm of two nodes of one cpu each (two slurmd on this host)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(cpus=1, nodes=2) as two:
        yield two


def test_a_pilot_of_two_nodes_runs_an_executor_on_each_and_leaves_as_one(cluster, slurm2):
    """--nodes-per-job 2: one job, an executor per node (slurm-<job>.0 and .1), each a node of
    the fleet; idle, both drain and the job ends; no job is left."""
    name = f"nodes-{uuid.uuid4().hex[:6]}"
    cluster.start_dispatcher()
    prov = _provisioner(cluster, slurm2, "provisioner", "--cluster", name, "--nodes-per-job", "2",
                        "--max-executors", "2", "--idle-release", "1", "--job-time", "10")
    with cluster.client() as client:
        futures = client.submit_commands(["sleep 0.2"] * 20)
        wait_until(lambda: len(cluster.registered(client)) == 2, timeout_s=60, what="both nodes' executors")
        (job,) = _jobs(slurm2, name)
        assert cluster.registered(client) == {f"slurm-{job}.0", f"slurm-{job}.1"}
        assert all(f.result(timeout=120).ok for f in futures)
        assert {f.result().executor for f in futures} == {f"slurm-{job}.0", f"slurm-{job}.1"}
        wait_until(lambda: not cluster.registered(client), timeout_s=60, what="idle nodes to be released")
        wait_until(lambda: not _jobs(slurm2, name), timeout_s=60, what="the job to end")
        assert client.status()["lost_executors"] == 0
        launches = [r for r in _reasons(client) if r.startswith("started ")]
        assert launches == [f"started 2 slurm:debug: slurm-{job}.0, slurm-{job}.1"], _reasons(client)
    prov.send_signal(signal.SIGTERM)
    assert prov.wait(60) == 0


def test_a_pilot_that_ends_before_its_executor_registers_is_a_failed_launch(cluster, slurm):
    """A prologue that fails ends the job at once: the provisioner counts a failed launch,
    says why, and backs off instead of submitting pilots in a loop."""
    name = f"badprologue-{uuid.uuid4().hex[:6]}"
    cluster.start_dispatcher()
    prov = _provisioner(cluster, slurm, "provisioner", "--cluster", name, "--max-executors", "1",
                        "--job-time", "10", "--sbatch-prologue", "echo no such module >&2; exit 3")
    with cluster.client() as client:
        client.submit_commands(["true"])
        fleet = wait_until(lambda: (f := _fleet(client)).get("launch_failures", 0) >= 1 and f, timeout_s=60,
                           what="a failed launch")
        assert "ended before its executor registered: FAILED" in fleet["last_error"], fleet["last_error"]
        assert fleet["backoff_s"] > 0 and fleet["api_calls"].get("sbatch") == 1
    prov.send_signal(signal.SIGTERM)
    assert prov.wait(60) == 0
