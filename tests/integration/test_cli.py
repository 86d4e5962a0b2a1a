"""The falconet command line, end to end, as a person would run it."""

from __future__ import annotations

import json
import subprocess

from cluster_helpers import wait_until

from falconet import spawn

FALCONET = spawn.falconet()


def falconet(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*FALCONET, *args], capture_output=True, text=True, timeout=timeout, **kw)


def test_run_local_all_succeed(tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("# a comment\n\n" + "".join(f"echo line{i}\n" for i in range(50)))
    out = tmp_path / "results.jsonl"
    res = falconet("run", str(tasks), "--local", "2", "--results", str(out))
    assert res.returncode == 0, res.stderr
    assert "50 tasks: 50 done, 0 failed" in res.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 50
    by_line = {r["line"]: r for r in records}
    assert set(by_line) == set(range(3, 53))  # the comment and blank line keep their numbers
    for r in records:
        assert r["state"] == "done" and r["exit_code"] == 0
        assert r["stdout"] == f"line{r['line'] - 3}\n"
        assert {"id", "command", "stderr", "executor", "attempts", "submitted", "started", "finished"} <= set(r)
        assert r["submitted"] <= r["started"] <= r["finished"] and r["attempts"] == 1 and r["executor"]


def test_run_local_reports_failures_and_exits_1(tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("true\necho oops >&2; exit 3\nno-such-program-xyz\n")
    out = tmp_path / "results.jsonl"
    res = falconet("run", str(tasks), "--local", "1", "--results", str(out), "--quiet")
    assert res.returncode == 1
    assert "3 tasks: 1 done, 2 failed" in res.stderr
    assert "line 2:" in res.stderr and "exit code 3" in res.stderr and "oops" in res.stderr
    records = {r["line"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records[1]["state"] == "done"
    assert records[2]["state"] == "failed" and records[2]["exit_code"] == 3
    assert records[3]["state"] == "failed" and records[3]["exit_code"] == 127


def test_run_rejects_a_bad_task_file_with_line_numbers(tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo fine\necho 'unterminated\n")
    res = falconet("run", str(tasks), "--local", "1")
    assert res.returncode == 2
    assert f"{tasks}:2:" in res.stderr and "quot" in res.stderr


def test_run_refuses_a_ten_megabyte_line_at_once_in_one_line(tmp_path):
    # Before the limit, the quoting check of this line ran for minutes at 100% CPU.
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("true\necho " + "a" * 10_000_000 + "\ntrue\n")
    res = falconet("run", str(tasks), "--local", "1", timeout=30)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: {tasks}:2: a line of 10,000,005 bytes is longer than the limit of "
                                 "131,071"), res.stderr
    assert "put the long data in a file" in res.stderr


def test_usage_errors_exit_2(tmp_path):
    assert falconet("run").returncode == 2
    assert falconet("run", str(tmp_path / "missing.txt"), "--local", "1").returncode == 2
    tasks = tmp_path / "t.txt"
    tasks.write_text("true\n")
    both = falconet("run", str(tasks), "--local", "1", "--dispatcher", "tcp://127.0.0.1:1")
    assert both.returncode == 2 and "give one of" in both.stderr


def test_every_command_has_help():
    for cmd in ([], ["run"], ["dispatcher"], ["executor"], ["status"], ["executors"]):
        res = falconet(*cmd, "--help")
        assert res.returncode == 0 and "Usage:" in res.stdout
    assert "FALCONET_EXECUTOR_DISPATCHER" in falconet("executor", "--help").stdout


def test_run_status_and_executors_against_a_running_dispatcher(cluster, tmp_path):
    cluster.start_dispatcher()
    cluster.start_executor("ex-cli", 2)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client), what="registration")
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"echo {i}\n" for i in range(20)))
    res = falconet("run", str(tasks), "--dispatcher", cluster.client_address)
    assert res.returncode == 0, res.stderr
    status = falconet("status", "--dispatcher", cluster.client_address)
    assert status.returncode == 0
    assert "done 20" in status.stdout and "ex-cli" in status.stdout
    rows = json.loads(falconet("executors", "--dispatcher", cluster.client_address, "--json").stdout)
    assert [r["id"] for r in rows] == ["ex-cli"] and rows[0]["slots"] == 2 and rows[0]["host"]
    env_status = falconet("status", env={"FALCONET_STATUS_DISPATCHER": cluster.client_address,
                                         "PATH": "/usr/bin:/bin"})
    assert env_status.returncode == 0 and "ex-cli" in env_status.stdout


def test_status_of_a_missing_dispatcher_is_one_clear_line():
    res = falconet("status", "--dispatcher", "tcp://127.0.0.1:9", timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith("error: no dispatcher answered at tcp://127.0.0.1:9")


def test_dispatcher_refuses_a_public_address_without_insecure():
    res = falconet("dispatcher", "--host", "0.0.0.0", timeout=30)
    assert res.returncode == 1 and "--insecure" in res.stderr


def test_ctrl_c_stops_a_local_run_and_leaves_no_process_behind(tmp_path):
    import signal

    import psutil

    tasks = tmp_path / "tasks.txt"
    tasks.write_text("sleep 30\n" * 8)
    proc = subprocess.Popen([*FALCONET, "run", str(tasks), "--local", "2"], stderr=subprocess.PIPE,
                            text=True)
    me = psutil.Process(proc.pid)
    # dispatcher, executor and its two slots, each running a sleep
    wait_until(lambda: sum(p.name() == "sleep" for p in me.children(recursive=True)) == 2,
               what="two running sleeps")
    family = me.children(recursive=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted: 8 tasks: 0 done" in err
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family),
               timeout_s=30, what="every child process to exit")


def test_falconet_dispatcher_in_the_environment_reaches_every_client_command(cluster, tmp_path):
    import os

    cluster.start_dispatcher()
    cluster.start_executor("ex-env", 1)
    env = {**os.environ, "FALCONET_DISPATCHER": cluster.client_address}
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"ex-env"}, what="the executor")
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo one\necho two\n")
    out = tmp_path / "results.jsonl"
    res = falconet("run", str(tasks), "--results", str(out), "-q", env=env)
    assert res.returncode == 0, res.stderr
    assert {json.loads(line)["executor"] for line in out.read_text().splitlines()} == {"ex-env"}
    res = falconet("submit", "--json", "echo hi", env=env)
    assert res.returncode == 0 and json.loads(res.stdout)["executor"] == "ex-env", res.stderr
    res = falconet("executors", "--json", env=env)
    assert [row["id"] for row in json.loads(res.stdout)] == ["ex-env"], res.stderr
    # a command's own name wins over the shared one; --local on the command line over both
    res = falconet("status", "--json", env={**env, "FALCONET_STATUS_DISPATCHER": cluster.client_address,
                                            "FALCONET_DISPATCHER": "tcp://127.0.0.1:9"})
    assert res.returncode == 0 and json.loads(res.stdout)["executors"] == 1, res.stderr
    res = falconet("run", str(tasks), "--local", "1", "--results", str(out), "-q", env=env)
    assert res.returncode == 0, res.stderr
    assert "ex-env" not in {json.loads(line)["executor"] for line in out.read_text().splitlines()}


def test_status_counts_started_tasks_as_running_and_memory_in_mb(cluster, tmp_path):
    cluster.start_dispatcher()
    cluster.start_executor("ex-st", 2, "--memory", "3000", "--prefetch", "2")
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client), what="registration")
        futures = client.submit_commands(["sleep 30"] * 6)
        wait_until(lambda: client.status()["tasks"]["running"] == 2
                   and client.status()["tasks"]["dispatched"] == 2, what="2 running, 2 held")
        res = falconet("status", "--dispatcher", cluster.client_address)
        for fut in futures:
            fut.cancel()
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(map(len, lines[:4])) <= 100, lines[:4]
    assert "dispatched 2 (held, not started)  running 2" in res.stdout
    assert "executors 1 (2 slots, 2 running, 4 assigned)" in res.stdout
    header = next(line for line in lines if line.startswith("ID "))
    row = next(line for line in lines if line.startswith("ex-st "))
    cells = dict(zip(header.split(), row.replace(" MB", "MB").split()))
    assert cells["MEMORY"] == "3000MB" and cells["RUNNING"] == "2" and cells["ASSIGNED"] == "4"
    rows = json.loads(falconet("executors", "--dispatcher", cluster.client_address, "--json").stdout)
    assert rows[0]["memory_mb"] == 3000


def test_run_show_output_prints_each_task_s_stdout_tagged_with_its_line(tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("# two tasks\necho one\nprintf 'a\\nb'\necho silent >&2\n")
    res = falconet("run", str(tasks), "--local", "2", "--show-output", "-q")
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.splitlines()) == ["[2] one", "[3] a", "[3] b"]
    assert res.stdout.index("[3] a") + len("[3] a\n") == res.stdout.index("[3] b")  # a task's lines together
    quiet = falconet("run", str(tasks), "--local", "2", "-q")
    assert quiet.returncode == 0 and quiet.stdout == ""
