"""The provisioner's EC2 backend end to end: real processes against moto's EC2 on loopback.

A dispatcher and `falconet provisioner --backend ec2` run as processes; moto's server plays
EC2's API, and ec2sim's Hypervisor boots each running instance by serving it an IMDSv2 and
starting `falconet executor --from-instance-metadata`, so instances really join
(DESIGN.md, Testing against real parts).  Every test has its own cluster name; no test may
touch another cluster's or an untagged instance.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cluster_helpers import Cluster, wait_until

import falconet
from falconet import spawn
from falconet.benchmarks.ec2sim import REGION, Hypervisor, MotoEc2
from falconet.protocol import TaskState
from falconet.provisioner.ec2 import CLUSTER_TAG, TOKEN_TAG

LIVE = ("pending", "running")


@pytest.fixture(scope="module")
def moto():
    with MotoEc2() as m:
        yield m


@pytest.fixture(scope="module", autouse=True)
def bystanders(moto: MotoEc2):
    """An untagged instance and one of another cluster, running before every test and after all."""
    ec2 = moto.ec2
    untagged = ec2.run_instances(ImageId=moto.image_id, InstanceType="c5.large", MinCount=1, MaxCount=1)
    other = ec2.run_instances(ImageId=moto.image_id, InstanceType="c5.large", MinCount=1, MaxCount=1,
                              TagSpecifications=[_tags(f"other-{uuid.uuid4().hex[:8]}", "theirs")])
    ids = [r["Instances"][0]["InstanceId"] for r in (untagged, other)]
    yield ids
    assert _states(moto, ids) == ["running", "running"], "a test touched an instance not of its cluster"
    ec2.terminate_instances(InstanceIds=ids)


class Ec2Run:
    """One test's cloud: a dispatcher, a unique cluster, its provisioners and hypervisor."""

    def __init__(self, moto: MotoEc2, cluster: Cluster, log_dir: Path):
        self.moto, self.cluster, self.log_dir = moto, cluster, log_dir
        self.name = f"t-{uuid.uuid4().hex[:10]}"
        self.hyper: Hypervisor | None = None

    def hypervisor(self, enabled: bool = True) -> Hypervisor:
        """Start the cloud's hypervisor for this cluster (enabled=False: instances never boot)."""
        self.hyper = Hypervisor(self.moto, self.name, self.log_dir, enabled=enabled).start()
        return self.hyper

    def args(self, *extra: str, ami: str = "name:falconet-executor-*", endpoint: str = "") -> list[str]:
        """The provisioner's command line for this cluster, rounds every 0.3 s."""
        return [*spawn.falconet(), "provisioner", "--dispatcher", self.cluster.client_address,
                "--backend", "ec2", "--ec2-endpoint-url", endpoint or self.moto.url, "--region", REGION,
                "--ami", ami, "--instance-types", "c5.large", "--cluster", self.name,
                "--interval", "0.3", "--log-level", "info", *extra]

    def provisioner(self, *extra: str, label: str = "provisioner", env: dict | None = None,
                    endpoint: str = "") -> subprocess.Popen:
        """Start a provisioner in its own process group, logging to LABEL.log."""
        with open(self.log_dir / f"{label}.log", "ab") as log:
            proc = subprocess.Popen(self.args(*extra, endpoint=endpoint), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True,
                                    env={**self.moto.env(), **(env or {})})
        self.cluster.procs[label] = proc  # the cluster fixture kills it if the test does not
        return proc

    def fails(self, *extra: str, ami: str = "name:falconet-executor-*", env: dict | None = None) -> list[str]:
        """Run a provisioner that must exit 1 at start; its 'error:' lines."""
        done = subprocess.run(self.args(*extra, ami=ami), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60, env=env or self.moto.env(), start_new_session=True)
        assert done.returncode == 1, done.stderr
        return [line for line in done.stderr.splitlines() if line.startswith("error:")]

    def live(self) -> list[str]:
        """Ids of this cluster's pending or running instances."""
        return sorted(i["InstanceId"] for i in self.moto.instances(self.name, LIVE))

    def close(self) -> None:
        """Kill the processes, then terminate whatever the test left of its cluster."""
        for proc in self.cluster.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.hyper is not None:
            self.hyper.stop()
        leftover = self.live()
        if leftover:
            self.moto.ec2.terminate_instances(InstanceIds=leftover)


@pytest.fixture
def run(moto: MotoEc2, cluster: Cluster, tmp_path: Path):
    cluster.start_dispatcher()
    r = Ec2Run(moto, cluster, tmp_path)
    try:
        yield r
    finally:
        r.close()


def _tags(cluster: str, token: str) -> dict:
    return {"ResourceType": "instance", "Tags": [{"Key": CLUSTER_TAG, "Value": cluster},
                                                 {"Key": TOKEN_TAG, "Value": token}]}


def _states(moto: MotoEc2, ids: list[str]) -> list[str]:
    found = moto.ec2.describe_instances(InstanceIds=ids)["Reservations"]
    by_id = {i["InstanceId"]: i["State"]["Name"] for r in found for i in r["Instances"]}
    return [by_id[i] for i in ids]


def launched(run: Ec2Run) -> set[str]:
    """Every instance the cluster has had, in any state."""
    return {i["InstanceId"] for i in run.moto.instances(run.name, states=None)}


def fleet(client: falconet.Client) -> dict:
    """The provisioner's last report, as the dispatcher shows it ({} before the first)."""
    return client.status(detail=True).get("fleet", {})


def report_after(client: falconet.Client, rounds: int, what: str = "the provisioner's report") -> dict:
    return wait_until(lambda: (f := fleet(client)).get("rounds", 0) >= rounds and f, 30, what)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def hold(predicate, seconds: float, what: str) -> None:
    """Fail unless predicate stays true for this long (polled, for things that must not happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), what
        time.sleep(0.1)


# ---------------------------------------------------------------- scaling with real executors


def test_a_fleet_grows_runs_every_task_and_shrinks_to_nothing(run):
    run.hypervisor()
    prov = run.provisioner("--slots", "2", "--max-executors", "4", "--idle-release", "1",
                           "--policy", "exponential")
    with run.cluster.client() as client:
        report_after(client, 1)
        assert run.live() == [] and client.status()["executors"] == 0
        started = time.monotonic()
        futures = client.submit_commands(["true"] * 500)
        rows = wait_until(lambda: client.status(detail=True)["executor_table"], 60, "a registered executor")
        print(f"\nfirst submit to first registered executor: {time.monotonic() - started:.2f}s")
        assert {r["id"] for r in rows} <= launched(run)
        assert {r["facts"]["instance_type"] for r in rows} == {"c5.large"}

        cf.wait(futures, timeout=60)
        assert {f.info.state if f.info else None for f in futures} == {TaskState.DONE}
        assert {f.result().executor for f in futures} <= launched(run)
        wait_until(lambda: not run.live() and client.status()["executors"] == 0, 60,
                   "the fleet to shrink to --min-executors 0")
        assert len(launched(run)) <= 4  # --max-executors, and no relaunch
        assert stop(prov) == 0
        assert run.live() == []


def test_keep_leaves_the_fleet_running(run):
    run.hypervisor()
    prov = run.provisioner("--slots", "1", "--min-executors", "2", "--keep")
    with run.cluster.client() as client:
        wait_until(lambda: client.status()["executors"] == 2, 60, "two executors from --min-executors")
        kept = run.live()
        assert stop(prov) == 0
        assert len(kept) == 2 and _states(run.moto, kept) == ["running", "running"]
        assert client.status()["executors"] == 2  # not even drained
    run.moto.ec2.terminate_instances(InstanceIds=kept)
    assert run.live() == []


def test_an_executor_that_leaves_has_its_instance_terminated(run):
    run.hypervisor()
    run.provisioner("--slots", "2", "--executor-idle-timeout", "1", "--idle-release", "1000")
    with run.cluster.client() as client:
        futures = client.submit_commands(["true"] * 2)
        done = [f.result(timeout=60) for f in futures]
        assert all(r.ok for r in done)
        reported = {f"stop {iid}: its executor left" for iid in {r.executor for r in done}}
        wait_until(lambda: reported <= {line for d in fleet(client)["decisions"] for line in d["reasons"]},
                   30, f"the provisioner to report {reported}")
        assert run.live() == [] and client.status()["executors"] == 0


# ---------------------------------------------------------------- crashes and leftovers


def test_a_provisioner_killed_right_after_run_instances_does_not_launch_again(run):
    run.hypervisor(enabled=False)  # the instances stay booting
    common = ("--slots", "1", "--policy", "all-at-once", "--boot-timeout", "600")
    with run.cluster.client() as client:
        client.submit_commands(["true"] * 3)
        first = run.provisioner(*common, label="provisioner-1",
                                env={"FALCONET_FAILPOINTS": "ec2-after-run-instances"})
        assert first.wait(timeout=60) == -signal.SIGKILL
        launched = run.live()
        assert len(launched) == 3

        second = run.provisioner(*common, label="provisioner-2")
        report = report_after(client, 3, "three rounds of the second provisioner")
        assert run.live() == launched  # without adoption by tag there would be 6
        assert sorted(n["id"] for n in report["nodes"]) == launched
        assert report["counts"]["booting"] + report["counts"]["requested"] == 3
        assert "RunInstances" not in report["api_calls"]
        assert stop(second) == 0
        assert run.live() == []
        assert set(_states(run.moto, launched)) == {"terminated"}


def test_clean_orphans_terminates_the_clusters_instances_and_nothing_else(run, bystanders):
    orphans = [i["InstanceId"] for i in run.moto.ec2.run_instances(
        ImageId=run.moto.image_id, InstanceType="c5.large", MinCount=2, MaxCount=2,
        TagSpecifications=[_tags(run.name, "an-earlier-run")])["Instances"]]
    prov = run.provisioner("--clean-orphans")
    with run.cluster.client() as client:
        report = report_after(client, 1)
        assert report["nodes"] == [] and run.live() == []
        assert set(_states(run.moto, orphans)) == {"terminated"}
        assert _states(run.moto, bystanders) == ["running", "running"]
        assert stop(prov) == 0
    assert _states(run.moto, bystanders) == ["running", "running"]


# ---------------------------------------------------------------- failures


def test_an_instance_that_never_registers_is_terminated_and_launches_back_off(run):
    run.hypervisor(enabled=False)
    prov = run.provisioner("--slots", "1", "--boot-timeout", "1")
    with run.cluster.client() as client:
        client.submit_commands(["true"])
        report = wait_until(lambda: (f := fleet(client)).get("launch_failures") and f, 30, "a launch failure")
        assert report["launch_failures"] == 1 and report["backoff_s"] > 0
        assert "registered no executor within 1s" in report["last_error"]
        assert run.live() == []
        # The default backoff is 10 s: no second launch for a while, not one per round.
        hold(lambda: fleet(client)["api_calls"].get("RunInstances") == 1, 4, "a launch during the backoff")
        assert prov.poll() is None


def test_a_failing_launch_is_reported_and_backs_off(run):
    prov = run.provisioner("--subnet", "subnet-doesnotexist")
    with run.cluster.client() as client:
        client.submit_commands(["true"])
        report = wait_until(lambda: (f := fleet(client)).get("launch_failures") and f, 30, "a launch failure")
        assert "InvalidSubnetID.NotFound" in report["last_error"], report["last_error"]
        hold(lambda: fleet(client)["launch_failures"] == 1 and prov.poll() is None, 3,
             "a second launch during the backoff, or an exit")
        assert fleet(client)["api_calls"]["RunInstances"] == 1
        assert run.live() == []


def test_the_provisioner_rides_out_an_ec2_api_outage(run):
    run.hypervisor(enabled=False)
    endpoint = MotoEc2().start()  # the same cloud (moto's state is per process) on a port we can close
    try:
        prov = run.provisioner("--min-executors", "1", endpoint=endpoint.url)
        with run.cluster.client() as client:
            wait_until(lambda: len(run.live()) == 1, 30, "the --min-executors instance")
            kept = run.live()
            endpoint.stop()
            rounds = fleet(client)["rounds"]
            log = run.log_dir / "provisioner.log"
            wait_until(lambda: log.read_text().count("round failed: describe_instances") >= 3, 30,
                       "rounds failing while the API is down")
            assert prov.poll() is None
            endpoint = MotoEc2(port=endpoint.port).start()
            report_after(client, rounds + 2, "rounds after the API is back")
            assert run.live() == kept  # neither leaked nor launched twice
            assert stop(prov) == 0
            assert run.live() == []
    finally:
        endpoint.stop()


def test_an_instance_type_ec2_does_not_offer_is_one_error_line(run):
    errors = run.fails("--instance-types", "c5.nosuchsize")
    assert len(errors) == 1 and "InvalidInstanceType" in errors[0], errors


def test_an_image_that_matches_nothing_is_one_error_line(run):
    errors = run.fails(ami="name:nothing-matches-*")
    assert len(errors) == 1 and "image" in errors[0] and "nothing-matches-*" in errors[0], errors


def test_missing_credentials_are_one_error_line(run):
    errors = run.fails(env=run.moto.env(credentials=False))
    assert len(errors) == 1 and "credentials" in errors[0], errors


def test_launch_options_reach_ec2(moto: MotoEc2, monkeypatch):
    """Subnet, security group, key pair, spot, extra tags, the image by tag, the cheapest fitting
    type, and the user-data: what the backend asks for is what EC2 records."""
    from falconet.provisioner.ec2 import Ec2Backend, Ec2Settings
    from falconet.provisioner.policy import Shape
    from falconet.userdata import UserData, parse

    for key, value in moto.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    ec2 = moto.ec2
    ec2.create_tags(Resources=[moto.image_id], Tags=[{"Key": "role", "Value": "falconet-test"}])
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName=f"g-{uuid.uuid4().hex[:6]}", Description="t",
                                      VpcId=vpc)["GroupId"]
    key = f"k-{uuid.uuid4().hex[:6]}"
    ec2.create_key_pair(KeyName=key)
    name = f"t-{uuid.uuid4().hex[:10]}"
    backend = Ec2Backend(Ec2Settings(
        cluster=name, ami="tag:role=falconet-test", instance_types=("c5.2xlarge", "c5.large"),
        region=REGION, endpoint_url=moto.url, subnet_id=subnet, security_group_ids=(group,),
        key_name=key, spot=True, tags={"team": "genomics"}), UserData(dispatcher="tcp://10.9.1.5:5556"))
    backend.prepare()
    assert backend.image_id == moto.image_id
    cheapest = min((t for t in backend.types() if t.fits(Shape(cpus=2))), key=lambda t: t.price_per_hour)
    assert cheapest.name == "c5.large" and cheapest.vcpus == 2
    try:
        started = backend.start(cheapest, 2, f"{name}-tok")
        assert len(started) == 2
        for inst in moto.instances(name):
            tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
            assert tags[CLUSTER_TAG] == name and tags[TOKEN_TAG] == f"{name}-tok" and tags["team"] == "genomics"
            assert inst["SubnetId"] == subnet and inst["KeyName"] == key
            assert [g["GroupId"] for g in inst["SecurityGroups"]] == [group]
            assert inst["InstanceLifecycle"] == "spot" and inst["InstanceType"] == "c5.large"
            ud = parse(moto.user_data(inst["InstanceId"]))
            assert (ud.dispatcher, ud.cluster, ud.launch_token) == ("tcp://10.9.1.5:5556", name, f"{name}-tok")
        assert {m.id for m in backend.list()} == {m.id for m in started}
        assert backend.api_calls()["RunInstances"] == 1
    finally:
        backend.stop([i["InstanceId"] for i in moto.instances(name)])
    assert moto.instances(name) == []
