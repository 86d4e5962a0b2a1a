"""Reading instance metadata over IMDSv2 from a real server, and the executor's boot path."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from cluster_helpers import wait_until

from falconet import spawn
from falconet.benchmarks.imds import TOKEN_HEADER, TTL_HEADER, ImdsServer
from falconet.executor.metadata import Instance, MetadataError, read_instance
from falconet.userdata import UserData

USER_DATA = b'{"falconet":1,"dispatcher":"tcp://10.0.1.5:5556"}'


def closed_port() -> int:
    """A loopback port that was free a moment ago and has no listener now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


# ---------------------------------------------------------------- the test server itself


def test_the_server_requires_the_token_handshake():
    with ImdsServer(user_data=USER_DATA) as imds:
        assert http("GET", imds.url + "/latest/meta-data/instance-id")[0] == 401
        assert http("GET", imds.url + "/latest/meta-data/instance-id", {TOKEN_HEADER: "forged"})[0] == 401
        assert http("PUT", imds.url + "/latest/api/token")[0] == 400  # no TTL header
        status, token = http("PUT", imds.url + "/latest/api/token", {TTL_HEADER: "60"})
        assert status == 200 and token
        auth = {TOKEN_HEADER: token.decode()}
        assert http("GET", imds.url + "/latest/meta-data/instance-id", auth) == (200, b"i-0123456789abcdef0")
        assert http("GET", imds.url + "/latest/user-data", auth) == (200, USER_DATA)
        assert http("GET", imds.url + "/latest/meta-data/no-such-thing", auth)[0] == 404
        imds.user_data = None
        assert http("GET", imds.url + "/latest/user-data", auth)[0] == 404
        assert imds.requests == 8


# ---------------------------------------------------------------- read_instance


def test_read_instance_returns_every_field():
    with ImdsServer("i-0aaaabbbbccccdddd", "m6i.xlarge", "eu-west-1b", USER_DATA) as imds:
        assert read_instance(imds.url, timeout_s=10) == Instance(
            "i-0aaaabbbbccccdddd", "m6i.xlarge", "eu-west-1b", USER_DATA)
        assert imds.requests == 5  # one token, four GETs


def test_an_expired_token_is_renewed_once():
    with ImdsServer(user_data=USER_DATA) as imds:
        imds.token_uses = 2  # the third GET gets 401, as after the TTL
        assert read_instance(imds.url, timeout_s=10).user_data == USER_DATA
        assert imds.requests == 7  # PUT, 2 GETs, a 401, PUT, the same GET again, user-data


def test_a_token_refused_even_when_fresh_is_a_clear_error():
    with ImdsServer(user_data=USER_DATA) as imds:
        imds.token_uses = 0
        with pytest.raises(MetadataError, match="refused a fresh token") as err:
            read_instance(imds.url, timeout_s=10)
        assert imds.requests == 4  # PUT, GET 401, PUT, GET 401: no retry loop
        assert "\n" not in str(err.value)


def test_missing_user_data_names_the_instance_at_once():
    with ImdsServer(instance_id="i-0feedfacecafebeef") as imds:
        with pytest.raises(MetadataError) as err:
            read_instance(imds.url, timeout_s=30)
        assert "i-0feedfacecafebeef" in str(err.value) and "user-data" in str(err.value)
        assert imds.requests == 5  # a 404 is final, not retried


def test_disabled_imds_is_refused_at_once():
    with ImdsServer(user_data=USER_DATA) as imds:
        imds.disabled = True
        with pytest.raises(MetadataError, match="disabled"):
            read_instance(imds.url, timeout_s=30)
        assert imds.requests == 1


def test_unreachable_service_gives_up_after_the_timeout():
    url = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(MetadataError) as err:
        read_instance(url, timeout_s=0.5)
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert "unreachable" in message and url in message and "refused" in message
    assert "\n" not in message
    assert 0.5 <= elapsed < 5


def test_server_errors_are_retried_until_it_answers():
    with ImdsServer(user_data=USER_DATA) as imds:
        imds.fail_first = 3
        assert read_instance(imds.url, timeout_s=10).user_data == USER_DATA
        assert imds.requests == 3 + 5


def test_server_errors_past_the_timeout_are_reported():
    with ImdsServer(user_data=USER_DATA) as imds:
        imds.fail_first = 10**6
        with pytest.raises(MetadataError, match=r"unreachable after 0\.5s \(HTTP 503\)"):
            read_instance(imds.url, timeout_s=0.5)


def test_a_service_that_comes_up_late_is_waited_for():
    """As at boot: the first connection is dropped, then the port is briefly closed, then served."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    imds = ImdsServer(user_data=USER_DATA, port=port)

    def drop_first_connection_then_serve() -> None:
        with listener:
            conn, _ = listener.accept()  # blocks until read_instance has connected
            conn.close()
        imds.start()

    starter = threading.Thread(target=drop_first_connection_then_serve, daemon=True)
    starter.start()
    try:
        assert read_instance(f"http://127.0.0.1:{port}", timeout_s=20).user_data == USER_DATA
    finally:
        starter.join(timeout=10)
        imds.stop()


# ---------------------------------------------------------------- the executor's boot path


def executor_args(url: str, timeout_s: float = 1) -> list[str]:
    return [*spawn.falconet(), "executor", "--from-instance-metadata",
            "--metadata-url", url, "--metadata-timeout", str(timeout_s)]


def boot(url: str, timeout_s: float = 1) -> subprocess.CompletedProcess:
    return subprocess.run(executor_args(url, timeout_s), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("user_data, named", [
    (b"dispatcher=tcp://10.0.1.5:5556", "not JSON"),
    (b'{"falconet": 1, "slots": 4}', "'dispatcher'"),
    (b'{"falconet": 1, "dispatcher": "tcp://10.0.1.5:5556", "slots": "4"}', "'slots'"),
    (b'{"falconet": 1, "dispatcher": "tcp://10.0.1.5:5556", "slot": 4}', "'slot'"),
    (b'{"falconet": 2, "dispatcher": "tcp://10.0.1.5:5556"}', "'falconet'"),
    (b"", "empty"),
])
def test_bad_user_data_stops_the_boot_with_exit_78(user_data, named):
    with ImdsServer(instance_id="i-0badbadbadbadbad0", user_data=user_data) as imds:
        res = boot(imds.url)
    lines = res.stderr.splitlines()
    assert res.returncode == 78, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert named in lines[0] and "i-0badbadbadbadbad0" in lines[0]


def test_no_user_data_stops_the_boot_with_exit_78():
    with ImdsServer(instance_id="i-0badbadbadbadbad0") as imds:
        res = boot(imds.url)
    assert res.returncode == 78
    assert res.stderr.startswith("error: instance i-0badbadbadbadbad0 has no user-data")


def test_unreachable_metadata_stops_the_boot_with_exit_78():
    res = boot(f"http://127.0.0.1:{closed_port()}")
    assert res.returncode == 78
    assert res.stderr.startswith("error: ") and "unreachable" in res.stderr


def test_an_executor_booted_from_metadata_joins_and_runs_tasks(cluster):
    cluster.start_dispatcher()
    user_data = UserData(dispatcher=cluster.executor_address, cluster="demo", slots=2,
                         launch_token="demo-0001", tags={"site": "test"}).to_json().encode()
    with ImdsServer("i-0abcdef1234567890", "c6g.large", "us-west-2c", user_data) as imds:
        with open(cluster.log_dir / "imds-executor.log", "wb") as log:
            proc = subprocess.Popen([*executor_args(imds.url, 10), "--log-level", "debug"],
                                    stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            with cluster.client() as client:
                wait_until(lambda: cluster.registered(client) == {"i-0abcdef1234567890"},
                           what="the executor to register under its instance id")
                results = [f.result(timeout=60) for f in client.submit_commands(
                    [f"echo {i}" for i in range(50)])]
                assert [r.stdout for r in results] == [f"{i}\n" for i in range(50)]
                assert {r.executor for r in results} == {"i-0abcdef1234567890"}
                [row] = client.status(detail=True)["executor_table"]
            assert row["id"] == "i-0abcdef1234567890" and row["slots"] == 2
            assert row["facts"]["instance_id"] == "i-0abcdef1234567890"
            assert row["facts"]["instance_type"] == "c6g.large"
            assert row["facts"]["availability_zone"] == "us-west-2c"
            assert row["facts"]["cluster"] == "demo" and row["facts"]["launch_token"] == "demo-0001"
            assert row["facts"]["tags"] == ["site=test"] and row["tags"] == ["site=test"]  # tags as words
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
