"""A command's output end to end: the cap and its warnings, --output-cap, and streams sent to files."""

from __future__ import annotations

import json
import subprocess

from cluster_helpers import wait_until

from falconet import spawn

BIG = "yes | head -c 3000000"  # 3 MB of "y\n": more than the default 1 MiB cap
CUT = "output cut to 1 MiB per stream (--output-cap to raise it, --output-dir to keep it whole)"


def falconet(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(spawn.falconet(*args), capture_output=True, text=True, timeout=timeout, **kw)


def records(path) -> dict[int, dict]:
    return {r["line"]: r for r in map(json.loads, path.read_text().splitlines())}


def start(cluster, *extra: str) -> None:
    """A dispatcher (with extra options) and one registered executor."""
    cluster.start_dispatcher(extra=extra)
    cluster.start_executor("ex-1", 2)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client), what="registration")


def test_run_says_how_many_tasks_had_output_cut_and_a_higher_cap_keeps_it(tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"{BIG}\n{BIG} >&2\necho small\n")
    out = tmp_path / "results.jsonl"
    res = falconet("run", str(tasks), "--local", "2", "--results", str(out), "-q")
    assert res.returncode == 0, res.stderr
    assert f"2 tasks had {CUT}" in res.stderr
    recs = records(out)
    assert recs[1]["truncated"] and len(recs[1]["stdout"]) == 1 << 20 and recs[1]["state"] == "done"
    assert recs[2]["truncated"] and len(recs[2]["stderr"]) == 1 << 20
    assert not recs[3]["truncated"] and recs[3]["stdout"] == "small\n"

    res = falconet("run", str(tasks), "--local", "2", "--results", str(out), "-q", "--output-cap", "4000000")
    assert res.returncode == 0, res.stderr
    assert "cut" not in res.stderr
    recs = records(out)
    assert not recs[1]["truncated"] and recs[1]["stdout"] == "y\n" * 1_500_000
    assert not recs[2]["truncated"] and len(recs[2]["stderr"]) == 3_000_000


def test_run_output_dir_keeps_every_byte_even_of_failed_tasks(tmp_path):
    (tmp_path / "data.txt").write_text("from the current directory\n")
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"{BIG}\necho bad >&2; exit 3\ncat data.txt\n")
    out = tmp_path / "results.jsonl"
    res = falconet("run", str(tasks), "--local", "2", "--results", str(out), "-q", "--output-dir", "logs",
                   cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    logs = tmp_path / "logs"
    assert (logs / "1.out").read_bytes() == b"y\n" * 1_500_000 and (logs / "1.err").read_bytes() == b""
    assert (logs / "2.err").read_text() == "bad\n" and (logs / "2.out").read_bytes() == b""
    assert (logs / "3.out").read_text() == "from the current directory\n"  # it ran where it would have
    assert "cut" not in res.stderr and f"(stderr in {logs / '2.err'})" in res.stderr
    recs = records(out)
    assert recs[1]["stdout"] == "" and not recs[1]["truncated"] and recs[1]["state"] == "done"
    assert recs[1]["outputs"] == {".falconet-stdout": str(logs / "1.out"), ".falconet-stderr": str(logs / "1.err")}
    assert recs[2]["state"] == "failed" and recs[2]["exit_code"] == 3


def test_run_output_dir_on_a_remote_dispatcher(cluster, tmp_path):
    start(cluster)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"{BIG}; echo {i} >&2\n" for i in range(3)))
    res = falconet("run", str(tasks), "--dispatcher", cluster.client_address, "-q",
                   "--output-dir", str(tmp_path / "logs"))
    assert res.returncode == 0, res.stderr
    for line in (1, 2, 3):
        assert (tmp_path / "logs" / f"{line}.out").stat().st_size == 3_000_000
        assert (tmp_path / "logs" / f"{line}.err").read_text() == f"{line - 1}\n"


def test_submit_warns_of_cut_output_and_keeps_it_whole_in_files(cluster, tmp_path):
    start(cluster)
    res = falconet("submit", "--dispatcher", cluster.client_address, BIG)
    assert res.returncode == 0 and len(res.stdout) == 1 << 20
    assert res.stderr == ("warning: its output was cut to 1 MiB per stream (--output-cap to raise it, "
                          "--stdout/--stderr FILE to keep it whole)\n")
    res = falconet("submit", "--dispatcher", cluster.client_address, "--output-cap", "4M", BIG)
    assert res.returncode == 0 and len(res.stdout) == 3_000_000 and res.stderr == ""
    res = falconet("submit", "--dispatcher", cluster.client_address, "--stdout", "out.txt", "--json",
                   f"{BIG}; echo oops >&2; exit 2", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    rec = json.loads(res.stdout)
    assert rec["stdout"] == "" and rec["stderr"] == "oops\n" and not rec["truncated"]
    assert (tmp_path / "out.txt").stat().st_size == 3_000_000


def test_a_cap_over_the_dispatcher_s_limit_is_refused_and_an_output_over_it_fails(cluster, tmp_path):
    start(cluster, "--max-output-bytes", "2000000")
    res = falconet("submit", "--dispatcher", cluster.client_address, "--output-cap", "3000000", BIG, timeout=60)
    assert res.returncode == 1 and "--max-output-bytes" in res.stderr and "2000000" in res.stderr
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"touch {tmp_path}/ran-1\n#falconet output-cap=3M\ntouch {tmp_path}/ran-2\n")
    res = falconet("run", str(tasks), "--dispatcher", cluster.client_address, "-q", timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("error: an output cap of 3 MiB is more than")
    assert not list(tmp_path.glob("ran-*"))  # refused before anything ran
    both = "yes | head -c 1500000; yes | head -c 1500000 >&2"
    res = falconet("submit", "--dispatcher", cluster.client_address, "--output-cap", "1500000", both, timeout=60)
    assert res.returncode == 1
    assert "more than the dispatcher's limit of 2000000 (--max-output-bytes)" in res.stderr


def test_the_python_api_sends_streams_to_files_and_says_truncated(cluster, tmp_path):
    start(cluster)
    with cluster.client() as client:
        cut = client.submit_command(BIG, output_cap=1000).result(timeout=60)
        assert cut.truncated and cut.ok and len(cut.stdout) == 1000
        whole = client.submit_command(f"{BIG}; echo e >&2", stdout=str(tmp_path / "o"),
                                      stderr=str(tmp_path / "e")).result(timeout=60)
        assert not whole.truncated and whole.ok and (whole.stdout, whole.stderr) == ("", "")
        assert (tmp_path / "o").stat().st_size == 3_000_000 and (tmp_path / "e").read_text() == "e\n"
