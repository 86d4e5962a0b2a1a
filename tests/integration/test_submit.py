"""Task requirements from the command line: `falconet run` directives and `falconet submit`, end to end."""

from __future__ import annotations

import json
import subprocess

from cluster_helpers import wait_until

from falconet import spawn

FALCONET = spawn.falconet()


def falconet(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*FALCONET, *args], capture_output=True, text=True, timeout=timeout, **kw)


def start(cluster, *executors: tuple[str, ...], extra: tuple = ()) -> None:
    """A dispatcher and executors (name, *options), waiting until every one is registered."""
    cluster.start_dispatcher(extra=extra)
    for name, *options in executors:
        cluster.start_executor(name, 2, *options)
    names = {name for name, *_ in executors}
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) >= names, what=f"registration of {sorted(names)}")


def test_run_sends_directive_lines_where_their_needs_fit(cluster, tmp_path):
    start(cluster, ("ex-plain", "--cpus", "2"), ("ex-gpu", "--cpus", "2", "--tag", "gpu"))
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo plain\n"
                     "#falconet cpus=2\n" + "echo big\n" * 4
                     + "#falconet tag=gpu\n" + "echo gpu\n" * 6
                     + "#falconet reset\necho plain\n")
    out = tmp_path / "results.jsonl"
    res = falconet("run", str(tasks), "--dispatcher", cluster.client_address, "--results", str(out), "-q")
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12 and all(r["state"] == "done" and r["outputs"] == {} for r in records)
    by_command = {c: [r for r in records if r["command"] == c] for c in ("echo plain", "echo big", "echo gpu")}
    assert {r["needs"] for r in by_command["echo plain"]} == {"cpus=1"}
    assert {r["needs"] for r in by_command["echo big"]} == {"cpus=2"}
    assert {r["needs"] for r in by_command["echo gpu"]} == {"cpus=1 tag=gpu"}
    assert {r["executor"] for r in by_command["echo gpu"]} == {"ex-gpu"}


def test_run_options_are_defaults_that_a_directive_replaces(cluster, tmp_path):
    start(cluster, ("ex-plain", "--cpus", "2"), ("ex-gpu", "--cpus", "2", "--tag", "gpu"))
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo default\n" * 4 + "#falconet cpus=1\necho directive\n")
    out = tmp_path / "results.jsonl"
    res = falconet("run", str(tasks), "--dispatcher", cluster.client_address, "--tag", "gpu",
                   "--results", str(out), "-q")
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    defaults = [r for r in records if r["command"] == "echo default"]
    assert len(defaults) == 4 and {(r["needs"], r["executor"]) for r in defaults} == {("cpus=1 tag=gpu", "ex-gpu")}
    assert [r["needs"] for r in records if r["command"] == "echo directive"] == ["cpus=1"]


def test_run_refuses_a_bad_directive_or_a_missing_input_before_running(tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo a\n#falconet cpus=lots\necho b\n")
    res = falconet("run", str(tasks), "--dispatcher", "tcp://127.0.0.1:9")
    assert res.returncode == 2 and f"{tasks}:2: directive: cpus must be a whole number" in res.stderr
    tasks.write_text("echo a\n#falconet input=missing.txt\necho b\n")
    res = falconet("run", str(tasks), "--dispatcher", "tcp://127.0.0.1:9", cwd=tmp_path)
    assert res.returncode == 2 and f"{tasks}:3: input file" in res.stderr and "missing.txt" in res.stderr


def test_submit_stages_an_input_in_and_an_output_back(cluster, tmp_path):
    start(cluster, ("ex-1", "--cpus", "2"))
    (tmp_path / "data.txt").write_text("hello falconet\n")
    res = falconet("submit", "--dispatcher", cluster.client_address, "--cpus", "1", "--input", "data.txt",
                   "--output", "out.txt", "--", "sh", "-c", "wc -c < data.txt > out.txt; echo said; echo warned >&2",
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.txt").read_text().strip() == "15"
    assert res.stdout == "said\n" and res.stderr == "warned\n"


def test_submit_exits_with_the_command_s_exit_code(cluster, tmp_path):
    start(cluster, ("ex-1", "--cpus", "2"))
    env_run = falconet("submit", "--", "false", env={"FALCONET_SUBMIT_DISPATCHER": cluster.client_address,
                                                   "PATH": "/usr/bin:/bin"})
    assert env_run.returncode == 1, env_run.stderr
    res = falconet("submit", "--dispatcher", cluster.client_address, "--json", "echo hi; exit 3")
    assert res.returncode == 3
    rec = json.loads(res.stdout)
    assert rec["exit_code"] == 3 and rec["stdout"] == "hi\n" and rec["state"] == "failed"
    assert rec["executor"] == "ex-1" and rec["needs"] == "cpus=1" and rec["outputs"] == {}


def test_submit_says_why_a_task_failed_when_its_exit_code_does_not(cluster, tmp_path):
    start(cluster, ("ex-1", "--cpus", "2"))
    res = falconet("submit", "--dispatcher", cluster.client_address, "--output", "nothere.txt", "true",
                   cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr == "error: the task failed: output 'nothere.txt' was not produced\n"
    res = falconet("submit", "--dispatcher", cluster.client_address, "--walltime", "0.5", "--", "sleep", "30")
    assert res.returncode == 137
    assert res.stderr == "error: the task failed: wall time of 0.5s exceeded; the command was killed\n"
    res = falconet("submit", "--dispatcher", cluster.client_address, "echo out; echo err >&2; exit 4")
    assert (res.returncode, res.stdout, res.stderr) == (4, "out\n", "err\n")  # the exit code says it all


def test_submit_fails_an_unschedulable_task_with_the_reason(cluster, tmp_path):
    start(cluster, ("ex-1", "--cpus", "2"), extra=("--fail-unschedulable", "2"))
    res = falconet("submit", "--dispatcher", cluster.client_address, "--cpus", "64", "--", "true", timeout=60)
    assert res.returncode == 1, res.stderr
    assert "unschedulable" in res.stderr and "64 cpus" in res.stderr


def test_submit_usage_errors_exit_2(tmp_path):
    assert falconet("submit", "--dispatcher", "tcp://127.0.0.1:9").returncode == 2  # no command
    res = falconet("submit", "--dispatcher", "tcp://127.0.0.1:9", "--input", "nope.txt", "true", cwd=tmp_path)
    assert res.returncode == 2 and "nope.txt" in res.stderr
    res = falconet("submit", "--dispatcher", "tcp://127.0.0.1:9", "--prefer", "local", "--where", "cloud", "true")
    assert res.returncode == 2 and "prefer='local' needs where='any'" in res.stderr
