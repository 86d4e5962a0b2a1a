"""CURVE on both ports with real processes: who gets in, on which port, and what a stranger can do.

Every dispatcher here runs with --keys on 127.0.0.1.  Keys come from `falconet keys init`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import msgpack
import pytest
import zmq
from cluster_helpers import dealer, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import falconet
from falconet import keys, spawn, tasks
from falconet import protocol as p
from falconet.benchmarks.imds import ImdsServer
from falconet.errors import KeyFileError
from falconet.userdata import UserData


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    run = subprocess.run([*spawn.falconet(), "keys", "init", str(tmp_path / "keys")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return tmp_path / "keys"


def as_client(d: Path, name: str = "client") -> dict:
    return {"dispatcher_key": str(d / "dispatcher.key"), "key": str(d / f"{name}.key_secret")}


def executor_keys(d: Path, name: str = "executor") -> tuple[str, ...]:
    return ("--dispatcher-key", str(d / "dispatcher.key"), "--key", str(d / f"{name}.key_secret"))


def square(x):
    return x * x


def test_keyed_clients_and_executors_run_tasks_and_status_says_curve(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    cluster.start_executor("ex", 2, *executor_keys(keydir))
    with cluster.client(**as_client(keydir)) as client:
        assert list(client.map(square, range(200))) == [x * x for x in range(200)]
        assert client.submit_command("echo hi").result(timeout=30).stdout == "hi\n"
        security = client.status()["security"]
    assert security["mode"] == "curve" and security["allowed"] >= 2
    run = subprocess.run([*spawn.falconet(), "status", "--dispatcher", cluster.client_address,
                          *executor_keys(keydir, "client")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "transport: curve" in run.stdout, run.stdout + run.stderr


def test_no_key_wrong_key_and_wrong_role_are_kept_out(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    with pytest.raises(falconet.DispatcherUnavailable):
        falconet.Client(cluster.client_address, connect_timeout_s=1.5)  # no keys at all
    with pytest.raises(falconet.DispatcherUnavailable, match="authorized/clients"):
        falconet.Client(cluster.client_address, connect_timeout_s=1.5, **as_client(keydir, "executor"))
    stranger = keydir.parent / "stranger"
    keys.init(stranger)
    with pytest.raises(falconet.DispatcherUnavailable):  # a key pair the dispatcher never saw
        falconet.Client(cluster.client_address, connect_timeout_s=1.5,
                        dispatcher_key=str(keydir / "dispatcher.key"), key=str(stranger / "client.key_secret"))
    with pytest.raises(falconet.DispatcherUnavailable):  # the right client key, the wrong server key
        falconet.Client(cluster.client_address, connect_timeout_s=1.5,
                        dispatcher_key=str(stranger / "dispatcher.key"), key=str(keydir / "client.key_secret"))
    cluster.start_executor("with-client-key", 1, *executor_keys(keydir, "client"))
    cluster.start_executor("real", 1, *executor_keys(keydir))
    with cluster.client(**as_client(keydir)) as client:
        wait_until(lambda: "real" in cluster.registered(client), what="the real executor")
        assert client.submit(square, 9).result(timeout=30) == 81
        security = client.status()["security"]
        assert cluster.registered(client) == {"real"}
    why = {(r["domain"], r["why"]) for r in security["recent_refusals"]}
    assert security["refused"] >= 3 and any(d == "executor" for d, _ in why), why


def test_a_key_added_while_running_is_let_in(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    run = subprocess.run([*spawn.falconet(), "keys", "add", str(keydir), "client", "late"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    with falconet.Client(cluster.client_address, **as_client(keydir, "late")) as client:
        assert client.status()["security"]["mode"] == "curve"


def test_readable_secret_files_are_refused_by_every_program(cluster, keydir):
    os.chmod(keydir / "client.key_secret", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        falconet.Client("tcp://127.0.0.1:1", **as_client(keydir))
    os.chmod(keydir / "executor.key_secret", 0o640)
    ex = subprocess.run([*spawn.falconet(), "executor", "--dispatcher", "tcp://127.0.0.1:1",
                         *executor_keys(keydir)], capture_output=True, text=True, timeout=60)
    assert ex.returncode == 78 and ex.stderr.count("\n") == 1 and "chmod 600" in ex.stderr, ex.stderr
    os.chmod(keydir / "dispatcher.key_secret", 0o604)
    disp = subprocess.run([*spawn.falconet(), "dispatcher", "--keys", str(keydir)],
                          capture_output=True, text=True, timeout=60)
    assert disp.returncode == 1 and disp.stdout == "" and "chmod 600" in disp.stderr, disp.stderr


def test_an_executor_booted_from_user_data_with_keys_joins(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    _, secret = keys.load_secret(keydir / "executor.key_secret")
    ud = UserData(dispatcher=cluster.executor_address, cluster="sec", slots=1,
                  dispatcher_key=keys.load_public(keydir / "dispatcher.key").decode(),
                  executor_secret_key=secret.decode())
    with ImdsServer("i-0feedfacecafe0001", "c5.large", "us-east-1a", ud.to_json().encode()) as imds:
        proc = subprocess.Popen([*spawn.falconet(), "executor", "--from-instance-metadata",
                                 "--metadata-url", imds.url], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            with cluster.client(**as_client(keydir)) as client:
                wait_until(lambda: cluster.registered(client) == {"i-0feedfacecafe0001"},
                           what="the executor booted with keys from user-data")
                assert client.submit(square, 5).result(timeout=30) == 25
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_frames = st.lists(st.one_of(st.binary(max_size=300),
                             st.lists(st.integers(-1, 2**33), max_size=6).map(msgpack.packb),
                             st.just(p.encode(p.Hello(p.PROTOCOL_VERSION, "x", "x"))),
                             st.just(p.encode(p.Register(p.PROTOCOL_VERSION, "intruder", "h", [], 1, 1, "x",
                                                         4, 1, {}, [])))),
                   min_size=1, max_size=3)


def test_fuzz_from_peers_without_the_right_keys_never_reaches_the_dispatcher(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    cluster.start_executor("ex", 2, *executor_keys(keydir))
    stranger = keydir.parent / "stranger"
    keys.init(stranger)
    server = keys.load_public(keydir / "dispatcher.key")
    ctx = zmq.Context()
    peers = []
    for address in (cluster.client_address, cluster.executor_address):
        peers += [dealer(ctx, address), dealer(ctx, address, (server, keys.load_secret(stranger / "client.key_secret")))]
    # the wrong role: the client's real key on the executor port, the executor's on the client port
    peers.append(dealer(ctx, cluster.executor_address, (server, keys.load_secret(keydir / "client.key_secret"))))
    peers.append(dealer(ctx, cluster.client_address, (server, keys.load_secret(keydir / "executor.key_secret"))))
    try:
        with cluster.client(**as_client(keydir)) as client:
            futures = client.map(square, range(2000))

            @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(_frames)
            def fuzz(message):
                for sock in peers:
                    try:
                        sock.send_multipart(message, zmq.NOBLOCK)
                    except zmq.Again:  # never let in, so its queue fills: what we expect
                        pass

            fuzz()
            assert list(futures) == [x * x for x in range(2000)]
            wait_until(lambda: client.status()["security"]["refused"] >= 4, what="every stranger refused")
            assert cluster.registered(client) == {"ex"}
            assert client.status()["clients"] == 1
    finally:
        for sock in peers:
            sock.close(0)
        ctx.term()
    log = (cluster.log_dir / "dispatcher.log").read_text()
    assert "malformed" not in log and "frame message" not in log, "a stranger's frame reached the loop"


def test_another_executor_key_cannot_take_over_an_executors_routing_id(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    keys.add_key(keydir, "executor", "evil")
    cluster.start_executor("ex", 1, *executor_keys(keydir))
    ctx = zmq.Context()
    evil = ctx.socket(zmq.DEALER)
    evil.setsockopt(zmq.LINGER, 0)
    evil.setsockopt(zmq.ROUTING_ID, b"ex")  # executor ids are public: falconet executors lists them
    try:
        with cluster.client(**as_client(keydir)) as client:
            wait_until(lambda: cluster.registered(client) == {"ex"}, what="the real executor")
            fut = client.submit_command("sleep 1; echo real")
            wait_until(lambda: client.status()["tasks"]["running"] == 1, what="the task running")
            keys.client_socket(evil, keys.load_public(keydir / "dispatcher.key"),
                               keys.load_secret(keydir / "evil.key_secret"))
            evil.connect(cluster.executor_address)
            forged = p.ExecResult(1, 1, int(p.TaskState.DONE),
                                  tasks.encode_command_output(0, b"forged\n", b"", False),
                                  "", 0.0, 0.0)
            for _ in range(20):
                evil.send(p.encode(p.Report(0, [], [forged])))
            assert fut.result(timeout=30).stdout == "real\n"
            assert client.status()["lost_executors"] == 0  # the real one was never pushed off
    finally:
        evil.close(0)
        ctx.term()


def test_plain_connections_to_a_keyed_dispatcher_count_as_refused(cluster, keydir):
    """A peer without keys fails the handshake before any ZAP request: the sockets' monitors count it."""
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    ctx = zmq.Context()
    try:
        with cluster.client(**as_client(keydir)) as client:
            before = client.status()["security"]
            peers = [dealer(ctx, address) for address in (cluster.client_address, cluster.executor_address)
                     for _ in range(5)]
            wait_until(lambda: client.status()["security"]["refused"] >= before["refused"] + 10,
                       timeout_s=30, what="ten plain connections counted as refused")
            security = client.status()["security"]
            for sock in peers:
                sock.close(0)
        assert security["handshakes_failed"] >= 10 and security["allowed"] == before["allowed"]
        whys = {(r["domain"], r["why"]) for r in security["recent_refusals"]}
        assert {d for d, _ in whys} == {"client", "executor"}, whys
        # libzmq reports a plain peer either as a mechanism mismatch or as a handshake cut short
        plain = ("the peer has no CURVE keys", "the connection closed during the handshake")
        assert all(any(text in why for text in plain) for _, why in whys), whys
    finally:
        ctx.term()
    run = subprocess.run([*spawn.falconet(), "status", "--json", "--dispatcher", cluster.client_address,
                          *executor_keys(keydir, "client")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["security"]["refused"] >= 10


def test_an_executor_without_keys_says_why_it_gets_no_answer(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    cluster.start_executor("keyless", 1)
    said = f"still not registered with {cluster.executor_address} after"
    wait_until(lambda: said in cluster.log("keyless"), timeout_s=20, what="the executor's complaint")
    line = next(ln for ln in cluster.log("keyless").splitlines() if said in ln)
    assert "probably started with --keys" in line and "--dispatcher-key" in line and "--key" in line, line
    with cluster.client(**as_client(keydir)) as client:
        security = client.status()["security"]
    assert security["handshakes_failed"] >= 1, security  # and the dispatcher counted it
