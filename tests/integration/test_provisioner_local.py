"""The provisioner with its local backend: real dispatcher, provisioner and executor processes."""

from __future__ import annotations

import signal
import subprocess

import psutil
from cluster_helpers import wait_until

import falconet
from falconet import spawn

FAST = ("--interval", "0.2", "--slots", "1", "--log-level", "debug")


def _fleet(client: falconet.Client) -> dict:
    return client.status(detail=True).get("fleet") or {}


def _executor_pids(provisioner: subprocess.Popen) -> set[int]:
    """Executor processes started by the provisioner (they run in sessions of their own)."""
    out = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "executor" in cmd and "--parent-pid" in cmd and cmd[cmd.index("--parent-pid") + 1] == str(provisioner.pid):
            out.add(proc.info["pid"])
    return out


def test_fleet_grows_with_the_queue_and_shrinks_when_idle(cluster):
    cluster.start_dispatcher()
    prov = cluster._spawn("provisioner", ["provisioner", "--dispatcher", cluster.client_address,
                                          "--max-executors", "3", "--idle-release", "0.5",
                                          "--policy", "all-at-once", *FAST])
    with cluster.client() as client:
        wait_until(lambda: _fleet(client).get("rounds", 0) >= 1, what="the provisioner's first report")
        assert cluster.registered(client) == set()  # no work, --min-executors 0: no executor
        futures = client.submit_commands(["sleep 0.05"] * 200)
        wait_until(lambda: len(cluster.registered(client)) == 3, what="the fleet to grow to --max-executors")
        assert all(f.result(timeout=60).ok for f in futures)
        executors = {f.result().executor for f in futures}
        assert len(executors) == 3 and all(e.startswith("local-") for e in executors)
        wait_until(lambda: not cluster.registered(client), what="idle executors to be released")
        fleet = _fleet(client)
        reasons = [r for d in fleet["decisions"] for r in d["reasons"]]
        assert any(r.startswith("launch 3 local") for r in reasons), reasons
        assert any(r.startswith("release ") and "idle" in r for r in reasons), reasons
        assert client.status()["lost_executors"] == 0  # released by drain, not killed
        # The fleet's story as events: three launched, three joined, released and gone.
        def counts() -> dict:
            events[:] = client.events(limit=5000)["events"]  # the observer thread lags the loop a little
            return {k: sum(e["event"] == k for e in events) for k in ("launched", "joined", "released", "left")}
        events: list = []
        wait_until(lambda: counts()["left"] == 3, what="three 'left' events")
        assert counts() == {"launched": 3, "joined": 3, "released": 3, "left": 3}
        launched = {e["node"] for e in events if e["event"] == "launched"}
        assert launched == {e["executor"] for e in events if e["event"] == "joined"}
    shown = subprocess.run([*spawn.falconet(), "status", "--dispatcher", cluster.client_address],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "fleet falconet (local, all-at-once, 0-3 executors)" in shown.stdout
    assert "release local-" in shown.stdout  # the last decisions, with their reasons
    prov.send_signal(signal.SIGTERM)
    assert prov.wait(30) == 0


def test_min_executors_are_kept_and_stopped_with_the_provisioner(cluster):
    cluster.start_dispatcher()
    prov = cluster._spawn("provisioner", ["provisioner", "--dispatcher", cluster.client_address,
                                          "--min-executors", "2", "--idle-release", "0", *FAST])
    with cluster.client() as client:
        wait_until(lambda: len(cluster.registered(client)) == 2, what="--min-executors executors")
        assert client.submit(pow, 3, 4).result(timeout=30) == 81
        rounds = _fleet(client)["rounds"]
        wait_until(lambda: _fleet(client)["rounds"] >= rounds + 5, what="more rounds")
        assert len(cluster.registered(client)) == 2  # idle, but the minimum stays
        pids = _executor_pids(prov)
        assert len(pids) == 2
        prov.send_signal(signal.SIGTERM)
        assert prov.wait(30) == 0
        wait_until(lambda: not cluster.registered(client), what="executors to leave with the provisioner")
        wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                   for p in pids), what="executor processes to end")


def test_config_file_and_clear_errors(cluster, tmp_path):
    cluster.start_dispatcher()
    config = tmp_path / "fleet.toml"
    config.write_text('[provisioner]\nmax-executors = 1\npolicy = "one-at-a-time"\nidle_release = 0.3\n')
    prov = cluster._spawn("provisioner", ["provisioner", "--dispatcher", cluster.client_address,
                                          "--config", str(config), *FAST])
    with cluster.client() as client:
        futures = client.submit_commands(["true"] * 20)
        assert all(f.result(timeout=60).ok for f in futures)
        fleet = _fleet(client)
        assert fleet["max_executors"] == 1 and fleet["policy"] == "one-at-a-time"
        assert len({f.result().executor for f in futures}) == 1
    prov.send_signal(signal.SIGTERM)
    assert prov.wait(30) == 0

    bad = tmp_path / "bad.toml"
    bad.write_text("[provisioner\nmax = 1\n")
    run = subprocess.run([*spawn.falconet(), "provisioner", "--dispatcher",
                          cluster.client_address, "--config", str(bad)], capture_output=True, text=True)
    assert run.returncode == 2 and "not valid TOML" in run.stderr
    run = subprocess.run([*spawn.falconet(), "provisioner", "--dispatcher",
                          cluster.client_address, "--min-executors", "5", "--max-executors", "2"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == "error: --min-executors is larger than --max-executors"


def test_run_a_task_file_on_an_elastic_local_fleet(tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"echo {i}\n" for i in range(30)))
    results = tmp_path / "out.jsonl"
    env = {"FALCONET_PROVISIONER_INTERVAL": "0.2", "FALCONET_PROVISIONER_SLOTS": "1",
           "FALCONET_PROVISIONER_MAX_EXECUTORS": "2"}
    import os

    run = subprocess.run([*spawn.falconet(), "run", str(tasks), "--provision", "local",
                          "--results", str(results), "-q"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    assert "30 done" in run.stderr
    assert len(results.read_text().splitlines()) == 30


def test_python_api_provision():
    with falconet.provision("local", interval=0.2, slots=1, max_executors=2, policy="exponential") as client:
        assert list(client.map(abs, range(-50, 0))) == list(range(50, 0, -1))
        fleet = client.status(detail=True)["fleet"]
        assert fleet["backend"] == "local" and fleet["policy"] == "exponential"
