"""The HTTP side and the event stream against a real dispatcher and real executors:
/metrics scraped during a run, /api/status, tokens, hostile HTTP clients, `falconet events`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from cluster_helpers import stop_processes, wait_until
from prometheus_client.parser import text_string_to_metric_families

import falconet
from falconet import spawn


def get(url: str, token: str = "", timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metrics(url: str, token: str = "") -> dict:
    """{(name, labels as a sorted tuple): value} of one scrape."""
    code, body = get(url + "/metrics", token)
    assert code == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def sample(m: dict, name: str, **labels: str) -> float:
    return m[name, tuple(sorted(labels.items()))]


def command(i: int) -> list[str]:
    return ["sh", "-c", f"exit {3 if i % 10 == 0 else 0}"]


def test_metrics_scraped_during_a_run_agree_with_the_run(cluster):
    cluster.start_dispatcher(extra=("--http-port", "0"))
    cluster.start_executor("e1", 2)
    cluster.start_executor("e2", 3)
    url = cluster.http_url
    with cluster.client() as client:
        wait_until(lambda: client.status()["slots"] == 5, what="both executors registered")
        futures = [client.submit_command(command(i)) for i in range(300)]
        scrapes = []
        while not all(f.done() for f in futures):
            scrapes.append(metrics(url))
        for f in futures:
            f.exception()
        # The snapshot is published about once a second: wait for one that has it all.
        m = wait_until(lambda: (lambda m: m if sample(m, "falconet_tasks_finished_total", outcome="done")
                                + sample(m, "falconet_tasks_finished_total", outcome="failed") == 300 else None)(
            metrics(url)), what="a snapshot with every task finished")
        status = client.status(detail=True)
    assert scrapes, "the run ended before a single scrape"
    assert sample(m, "falconet_tasks_submitted_total") == 300
    assert sample(m, "falconet_tasks_finished_total", outcome="failed") == 30
    assert sample(m, "falconet_tasks_finished_total", outcome="cancelled") == 0
    assert sample(m, "falconet_tasks", state="queued") == 0
    assert sample(m, "falconet_slots", state="busy") + sample(m, "falconet_slots", state="idle") == 5
    assert sample(m, "falconet_executors", state="active") == 2
    assert sample(m, "falconet_task_run_seconds_count") == 300
    assert sample(m, "falconet_task_wait_seconds_bucket", le="+Inf") == 300
    assert sample(m, "falconet_dispatcher_turn_seconds_count") > 0
    assert sample(m, "falconet_messages_total", port="executor", direction="in") > 0
    assert sample(m, "falconet_messages_total", port="client", direction="out") > 0
    assert sample(m, "falconet_fleet_spend_usd") == 0  # no provisioner
    # Counters never go back between scrapes.
    done = [sample(s, "falconet_tasks_finished_total", outcome="done") for s in scrapes + [m]]
    assert done == sorted(done)
    # /api/status is the dispatcher's own status, as `falconet status --json` prints it.
    code, body = get(url + "/api/status")
    api = json.loads(body)
    assert code == 200 and api["submitted_total"] == status["submitted_total"] == 300
    assert api["tasks"] == status["tasks"]
    assert sorted(r["id"] for r in api["executor_table"]) == ["e1", "e2"]
    code, body = get(url + "/api/dashboard")
    board = json.loads(body)
    assert board["status"]["submitted_total"] == 300 and len(board["history"]["t"]) >= 1
    assert {f["exit_code"] for f in board["failures"]} == {3}


def test_http_is_read_only_and_answers_bad_requests_with_their_reason(cluster):
    cluster.start_dispatcher(extra=("--http-port", "0"))
    url = cluster.http_url
    host, port = url.removeprefix("http://").split(":")
    for method in ("POST", "PUT", "DELETE"):
        req = urllib.request.Request(url + "/api/status", method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 405 and b"read-only" in err.value.read()
    assert get(url + "/static/../../etc/passwd")[0] == 404
    assert get(url + "/nothing-here")[0] == 404
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 431")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert get(url + "/metrics")[0] == 200  # still serving


def test_a_client_that_never_finishes_its_request_is_cut_off(cluster):
    """Slowloris: a request head still unfinished after HEAD_TIMEOUT_S loses its connection."""
    from falconet.dispatcher.web import HEAD_TIMEOUT_S

    cluster.start_dispatcher(extra=("--http-port", "0"))
    host, port = cluster.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HEAD_TIMEOUT_S * 4) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: 1\r\n")
        assert s.recv(100) == b""  # closed by the server, not by our timeout (that would raise)


def test_a_token_protects_every_route(cluster):
    cluster.start_dispatcher(extra=("--http-port", "0", "--http-token", "s3cret"))
    url = cluster.http_url
    for route in ("/", "/metrics", "/api/status", "/api/dashboard"):
        assert get(url + route)[0] == 401, route
        assert get(url + route, token="wrong")[0] == 401, route
    code, page = get(url + "/")
    assert b"token" in page and b"<form" in page
    assert get(url + "/metrics", token="s3cret")[0] == 200
    assert get(url + "/api/status?token=s3cret")[0] == 200
    assert get(url + "/static/app.js")[0] == 200  # no data in it, and browsers send no token for it


def test_beyond_loopback_http_needs_a_token_or_insecure(tmp_path):
    proc = subprocess.run([*spawn.falconet(), "dispatcher", "--http-port", "0", "--http-host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: refusing to serve HTTP on 0.0.0.0 without a token"), proc.stderr


def test_hostile_http_clients_do_not_stall_dispatching(cluster):
    """1,000 connections, half of them slowloris (a header line every second), while tasks run."""
    cluster.start_dispatcher(extra=("--http-port", "0"))
    cluster.start_executor("e1", 2)
    host, port = cluster.http_url.removeprefix("http://").split(":")
    socks = []
    try:
        for _ in range(1000):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, int(port)))
            socks.append(s)
        with cluster.client() as client:
            futures = [client.submit(abs, -i) for i in range(2000)]
            for k in range(3):  # slowloris: half the connections dribble header bytes
                for s in socks[::2]:
                    try:
                        s.send(b"GET / HTTP/1.1\r\n" if k == 0 else b"X-Slow: 1\r\n")
                    except OSError:
                        pass
            assert [f.result(timeout=60) for f in futures] == list(range(2000))
    finally:
        for s in socks:
            s.close()
    # Once the flood is gone, the HTTP side serves again.
    wait_until(lambda: get(cluster.http_url + "/metrics")[0] == 200, what="/metrics after the flood")


def _events_cli(client_address: str, *args: str, timeout: float = 30) -> list[dict]:
    out = subprocess.run([*spawn.falconet(), "events", "--dispatcher", client_address, *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_events_tell_each_task_and_executor_and_survive_a_restart(cluster, tmp_path):
    state = tmp_path / "state"
    cluster.start_dispatcher(extra=("--state-dir", str(state)))
    cluster.start_executor("e1", 2)
    with cluster.client(name="evt") as client:
        futures = [client.submit_command(command(i)) for i in range(20)]
        for f in futures:
            f.exception(timeout=60)
    events = wait_until(lambda: (lambda e: e if sum(x["event"] == "finished" for x in e) == 20 else None)(
        _events_cli(cluster.client_address)), what="20 finished events")
    kinds = [e["event"] for e in events]
    assert kinds.count("submitted") == 20 and kinds.count("joined") == 1
    assert [e["n"] for e in events] == sorted(e["n"] for e in events)
    finished = [e for e in events if e["event"] == "finished"]
    assert {e["executor"] for e in finished} == {"e1"} and {e["client"] for e in finished} == {"evt"}
    assert sorted(e["task"] for e in finished if e["outcome"] == "failed") == [1, 11]  # seqs from 1
    assert all(e["run_s"] is not None and e["run_s"] >= 0 for e in finished)
    only_exec = _events_cli(cluster.client_address, "--kind", "executor")
    assert [e["event"] for e in only_exec] == ["joined"]
    # A restart on the same state directory: the history is still there, numbering goes on.
    last = events[-1]["n"]
    cluster.kill("dispatcher", 15)
    cluster.dispatcher.wait(30)
    cluster.start_dispatcher(extra=("--state-dir", str(state)))
    again = _events_cli(cluster.client_address, "--since", "1h")
    assert [e["n"] for e in again if e["n"] <= last] == [e["n"] for e in events]
    assert _events_cli(cluster.client_address, "--since", "2000-01-01T00:00") == again
    assert _events_cli(cluster.client_address, "--after", str(last)) == [e for e in again if e["n"] > last]


def test_events_follow_prints_new_events_as_they_happen(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("e1", 2)
    follower = subprocess.Popen([*spawn.falconet(), "events", "--dispatcher", cluster.client_address, "-f",
                                 "--kind", "task"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    try:
        with cluster.client() as client:
            assert [f.result(timeout=60) for f in [client.submit(abs, -i) for i in range(5)]] == list(range(5))
        seen = []
        while sum(e["event"] == "finished" for e in seen) < 5:
            line = follower.stdout.readline()
            assert line, follower.stderr.read().decode()
            seen.append(json.loads(line))
        assert {e["event"] for e in seen} == {"submitted", "started", "finished"}
    finally:
        stop_processes([follower])


def test_a_dispatcher_without_events_says_so(cluster):
    cluster.start_dispatcher(extra=("--event-history", "0"))
    out = subprocess.run([*spawn.falconet(), "events", "--dispatcher", cluster.client_address],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "--event-history 0" in out.stderr


def test_bad_since_is_a_usage_error():
    out = subprocess.run([*spawn.falconet(), "events", "--dispatcher", "tcp://127.0.0.1:9", "--since", "yesterday"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "10m" in out.stderr


def test_local_with_a_dashboard_tells_where_it_is():
    with falconet.local(1, dashboard=True) as client:
        assert client.dashboard_url.startswith("http://127.0.0.1:")
        assert client.submit(abs, -4).result(timeout=60) == 4
        wait_until(lambda: json.loads(get(client.dashboard_url + "/api/status")[1]).get("slots") == 1,
                   what="the dashboard's status")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
