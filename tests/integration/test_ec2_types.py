"""Task requirements choose what the EC2 backend launches: real processes against moto's EC2.

The pattern of test_ec2.py (whose helpers these tests reuse): a real dispatcher, a real
`falconet provisioner --backend ec2` against moto's server on loopback, and, where
executors must join, ec2sim's hypervisor booting them from their user-data.  Tasks ask for
cpus, tags or a site; the tests look at the instance types EC2 records, the provisioner's
fleet report and, once, the tasks' results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster_helpers import wait_until
from test_ec2 import Ec2Run, fleet, hold, launched, report_after, stop

from falconet.benchmarks.ec2sim import MotoEc2
from falconet.userdata import parse

C5 = ("--instance-types", "c5.large,c5.2xlarge,c5.4xlarge", "--policy", "all-at-once",
      "--boot-timeout", "600")


@pytest.fixture(scope="module")
def moto():
    with MotoEc2() as m:
        yield m


@pytest.fixture
def run(moto: MotoEc2, cluster, tmp_path: Path):
    cluster.start_dispatcher()
    r = Ec2Run(moto, cluster, tmp_path)
    try:
        yield r
    finally:
        r.close()


def types_launched(run: Ec2Run) -> list[str]:
    """The instance type of every instance the cluster has had, sorted."""
    return sorted(i["InstanceType"] for i in run.moto.instances(run.name, states=None))


def test_the_type_follows_the_tasks_cpus(run):
    """2-cpu tasks get a 2-vCPU type and 8-cpu tasks an 8-vCPU one, each the cheapest that fits."""
    run.hypervisor(enabled=False)  # only launches are looked at: the instances stay booting
    prov = run.provisioner(*C5)
    with run.cluster.client() as client:
        report = report_after(client, 1)
        assert {(t["type"], t["cpus"], t["site"]) for t in report["can_launch"]} == {
            ("c5.large", 2, "cloud"), ("c5.2xlarge", 8, "cloud"), ("c5.4xlarge", 16, "cloud")}
        client.submit_commands(["true"] * 2, cpus=2)
        client.submit_commands(["true"], cpus=8)
        wait_until(lambda: len(types_launched(run)) == 3, 30, "three launches")
        assert types_launched(run) == ["c5.2xlarge", "c5.large", "c5.large"]
        rounds = fleet(client)["rounds"]
        report_after(client, rounds + 3, "three more rounds")
        assert types_launched(run) == ["c5.2xlarge", "c5.large", "c5.large"], "launched again for the same tasks"
        assert fleet(client)["unschedulable"] == []
        assert stop(prov) == 0


def test_a_prices_file_that_makes_a_bigger_type_cheaper_changes_the_choice(run, tmp_path):
    run.hypervisor(enabled=False)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"c5.2xlarge": 0.05}))  # a spot price, say: less than c5.large's
    run.provisioner(*C5, "--prices", str(prices))
    with run.cluster.client() as client:
        client.submit_commands(["true"] * 4, cpus=2)  # one c5.2xlarge holds all four
        wait_until(lambda: types_launched(run), 30, "a launch")
        report_after(client, fleet(client).get("rounds", 0) + 3, "three more rounds")
        assert types_launched(run) == ["c5.2xlarge"]


def test_tasks_that_must_run_locally_launch_nothing_and_are_unschedulable(run):
    run.hypervisor(enabled=False)
    run.provisioner(*C5)
    with run.cluster.client() as client:
        client.submit_commands(["true"] * 3, where="local")
        report = wait_until(lambda: (f := fleet(client)).get("unschedulable") and f, 30,
                            "the where=local tasks reported unschedulable")
        (line,) = report["unschedulable"]
        assert line.startswith("3 tasks need cpus=1 where=local, which none of the instance types "
                               "(c5.large, c5.2xlarge, c5.4xlarge) has"), line
        assert "needs where=local, is cloud" in line
        # the dispatcher, told what the provisioner can launch, says so too
        rows = wait_until(lambda: client.status()["unschedulable"], 30, "the dispatcher's unschedulable")
        assert [(r["needs"]["where"], r["count"]) for r in rows] == [("local", 3)]
        hold(lambda: launched(run) == set(), 2, "a launch for tasks that must run locally")


def test_executor_tags_reach_the_executors_and_tagged_tasks_run_there(run):
    """--executor-tag goes into the user-data; the booted executor reports it; the tasks needing
    it run on that executor, and an untagged task would not start another type."""
    run.hypervisor()
    prov = run.provisioner(*C5, "--executor-tag", "gpu", "--executor-tag", "zone=a", "--idle-release", "1")
    with run.cluster.client() as client:
        report = report_after(client, 1)
        assert {tuple(t["tags"]) for t in report["can_launch"]} == {("gpu", "site=cloud", "zone=a")}
        futures = client.submit_commands(["echo ok"] * 2, cpus=2, tags=["gpu", "site=cloud"])
        rows = wait_until(lambda: client.status(detail=True)["executor_table"], 60, "a booted executor")
        assert {"gpu", "zone=a", "site=cloud"} <= set(rows[0]["tags"]), rows[0]
        results = [f.result(timeout=60) for f in futures]
        assert all(r.ok and r.stdout.strip() == "ok" for r in results), results
        assert types_launched(run) == ["c5.large", "c5.large"]  # one 2-cpu task a c5.large
        for iid in {r.executor for r in results}:
            assert iid in launched(run)
            assert parse(run.moto.user_data(iid)).tags == {"gpu": "", "zone": "a"}
        wait_until(lambda: not run.live(), 60, "the idle fleet to be released")
        assert stop(prov) == 0


def test_a_mixed_workload_runs_to_completion_on_the_types_launched_for_it(run):
    """The simulated instances offer their type's vCPUs (ec2sim passes --cpus), so an 8-cpu
    task runs on the c5.2xlarge launched for it and nowhere else."""
    run.hypervisor()
    prov = run.provisioner(*C5, "--idle-release", "1")
    with run.cluster.client() as client:
        small = client.submit_commands(["echo small"] * 3, cpus=2)
        big = client.submit_commands(["echo big"], cpus=8)
        assert all(f.result(timeout=90).ok for f in small + big)
        types = {i["InstanceId"]: i["InstanceType"] for i in run.moto.instances(run.name, states=None)}
        assert {types[f.info.executor] for f in big} == {"c5.2xlarge"}
        assert {types[f.info.executor] for f in small} <= {"c5.large", "c5.2xlarge"}
        rows = {r["id"]: r for r in client.status(detail=True)["executor_table"]}
        assert {rows[f.info.executor]["cpus"] for f in big if f.info.executor in rows} <= {8}
        wait_until(lambda: not run.live(), 60, "the idle fleet to be released")
        assert stop(prov) == 0
