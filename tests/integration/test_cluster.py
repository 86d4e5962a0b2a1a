"""Dispatcher and executors as separate processes over loopback ZeroMQ."""

from __future__ import annotations

import os
import signal
import socket
import time

import msgpack
import pytest
import zmq
from cluster_helpers import HEARTBEAT_TIMEOUT_S, free_port, wait_until

import falconet
from falconet import protocol as p


def triple(x):
    return 3 * x


def slow_identity(x):
    time.sleep(0.002)
    return x


def test_commands_and_python_tasks_on_two_executors(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("ex-a", 2)
    cluster.start_executor("ex-b", 2)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"ex-a", "ex-b"}, what="both executors")
        cmds = client.submit_commands([f"echo task-{i}; echo err-{i} >&2" for i in range(2000)])
        results = [f.result(timeout=120) for f in cmds]
        assert [r.stdout for r in results] == [f"task-{i}\n" for i in range(2000)]
        assert [r.stderr for r in results] == [f"err-{i}\n" for i in range(2000)]
        assert all(r.exit_code == 0 and r.attempts == 1 for r in results)
        assert {r.executor for r in results} == {"ex-a", "ex-b"}

        values = list(client.map(triple, range(20_000), timeout=120))
        assert values == [3 * i for i in range(20_000)]
        info = client.status()
        assert info["tasks"]["done"] == 22_000
        assert info["queued"] == 0 and info["busy"] == 0


def test_sigkill_an_executor_mid_run_loses_nothing(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("victim", 2)
    cluster.start_executor("survivor", 2)
    with cluster.client() as client:
        wait_until(lambda: len(cluster.registered(client)) == 2, what="both executors")
        futures = [client.submit(slow_identity, i) for i in range(3000)]
        wait_until(lambda: sum(f.done() for f in futures) > 300, what="some progress")
        cluster.kill("victim")
        assert [f.result(timeout=120) for f in futures] == list(range(3000))
        infos = [f.info for f in futures]
        assert {i.executor for i in infos} == {"victim", "survivor"}
        assert any(i.attempts > 1 for i in infos), "the killed executor's tasks were re-run"
        status = client.status(detail=True)
        assert status["tasks"]["done"] == 3000  # exactly one result per task
        assert status["lost_executors"] == 1
        assert {r["id"] for r in status["executor_table"]} == {"survivor"}


def kill_my_executor():
    os.kill(os.getppid(), signal.SIGKILL)  # the slot's parent is the executor


def test_a_task_that_kills_executors_fails_after_its_retry_limit(cluster):
    cluster.start_dispatcher()
    for name in ("e1", "e2", "e3"):
        cluster.start_executor(name, 1)
    with cluster.client() as client:
        wait_until(lambda: len(cluster.registered(client)) == 3, what="three executors")
        fut = client.submit_python(kill_my_executor, retries=1)
        with pytest.raises(falconet.TaskError, match="lost.*retry limit of 1"):
            fut.result(timeout=60)
        assert client.status()["lost_executors"] == 2
        assert client.submit(triple, 5).result(timeout=30) == 15  # the last executor still serves


def _garbage_frames():
    yield b""
    yield b"\xff\xfe\x00garbage"
    yield msgpack.packb({"not": "a message"})
    yield msgpack.packb([999, 1, 2])
    yield msgpack.packb([int(p.MsgType.SUBMIT), "x", [1, 2]])
    yield msgpack.packb([int(p.MsgType.REPORT), 10, [[1]], [[1, 2, 3]]])
    yield msgpack.packb([int(p.MsgType.REPORT), 1_000_000, [], []])  # from a stranger
    yield p.encode(p.Hello(p.PROTOCOL_VERSION + 7, "old", "old"))
    yield p.encode(p.Register(p.PROTOCOL_VERSION + 7, "old", "h", [], 1, 1, "x", 1, 1, {}, []))
    yield b"\xdb\xff\xff\xff\xff"  # a str32 header claiming 4 GiB
    yield os.urandom(4096)


def test_garbage_on_both_ports_changes_nothing(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("ex", 2)
    ctx = zmq.Context()
    with cluster.client() as client:
        futures = client.map(slow_identity, range(2000))
        for address in (cluster.client_address, cluster.executor_address):
            host, port = address.rsplit("/", 1)[1].rsplit(":", 1)
            with socket.create_connection((host, int(port))) as raw:  # not even ZMTP
                raw.sendall(os.urandom(2048))
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(address)
            for frame in _garbage_frames():
                dealer.send(frame)
                dealer.send_multipart([frame, b"extra", b"frames"])
            replies = []
            poller = zmq.Poller()
            poller.register(dealer, zmq.POLLIN)
            while poller.poll(500):
                replies.append(p.decode(dealer.recv()))
            assert any(type(r) is p.Refused and "version" in r.reason for r in replies)
            dealer.close()
        assert list(futures) == list(range(2000))
        assert client.status()["tasks"]["done"] == 2000
    assert cluster.dispatcher.poll() is None
    ctx.term()


def test_sigterm_drains_an_executor(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("drained", 1, "--prefetch", "3")
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"drained"}, what="registration")
        futures = client.submit_commands(["sleep 0.3"] * 4)
        wait_until(lambda: client.status()["tasks"]["running"] >= 1, what="a running task")
        cluster.kill("drained", signal.SIGTERM)
        assert cluster.procs["drained"].wait(timeout=30) == 0
        wait_until(lambda: any(f.done() for f in futures), what="the running task's result")
        first = [f for f in futures if f.done()]
        assert all(f.result().ok and f.result().executor == "drained" for f in first)
        cluster.start_executor("rescuer", 2)
        assert all(f.result(timeout=30).ok for f in futures)
        assert {f.result().executor for f in futures} == {"drained", "rescuer"}
        assert all(f.result().attempts in (1, 2) for f in futures)
        assert client.status()["lost_executors"] == 0


def test_executor_leaves_when_idle(cluster):
    cluster.start_dispatcher()
    proc = cluster.start_executor("idler", 1, "--idle-timeout", "0.5")
    assert proc.wait(timeout=30) == 0
    with cluster.client() as client:
        wait_until(lambda: not cluster.registered(client), what="the idle executor to unregister")
        assert client.status()["lost_executors"] == 0


def test_executor_re_registers_after_a_dispatcher_restart(cluster):
    cport, eport = free_port(), free_port()
    cluster.start_dispatcher(cport, eport)
    cluster.start_executor("steady", 1)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"steady"}, what="registration")
    cluster.dispatcher.kill()
    cluster.dispatcher.wait()
    cluster.start_dispatcher(cport, eport)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"steady"}, timeout_s=HEARTBEAT_TIMEOUT_S + 30,
                   what="re-registration with the new dispatcher")
        assert client.submit(triple, 7).result(timeout=30) == 21


def sleepy(seconds):
    time.sleep(seconds)
    return seconds


def test_wall_time_limits(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("ex", 2)
    with cluster.client() as client:
        py = client.submit_python(sleepy, (30,), walltime_s=0.5)
        cmd = client.submit_command("sleep 30", walltime_s=0.5)
        with pytest.raises(falconet.TaskError, match="wall time"):
            py.result(timeout=20)
        res = cmd.result(timeout=20)
        assert not res.ok and "wall time" in res.reason
        assert client.submit(triple, 2).result(timeout=20) == 6  # the killed slot was replaced


def test_clients_learn_of_a_dead_or_restarted_dispatcher(cluster):
    cport, eport = free_port(), free_port()
    cluster.start_dispatcher(cport, eport)
    cluster.start_executor("ex", 3)  # one slot stays busy with an orphaned sleep after the restart
    patient = cluster.client()
    impatient = cluster.client(dispatcher_timeout_s=3)
    try:
        long_a = patient.submit_command("sleep 60")
        long_b = impatient.submit_command("sleep 60")
        wait_until(lambda: patient.status()["tasks"]["running"] >= 2, what="two running tasks")
        cluster.dispatcher.kill()
        cluster.dispatcher.wait()
        with pytest.raises(falconet.DispatcherUnavailable, match="no word from the dispatcher"):
            long_b.result(timeout=30)
        cluster.start_dispatcher(cport, eport)
        with pytest.raises(falconet.DispatcherUnavailable, match="restarted"):
            long_a.result(timeout=30)
        assert patient.submit(triple, 1).result(timeout=30) == 3  # and it carries on
    finally:
        patient.close()
        impatient.close()


def test_a_frozen_executor_is_replaced_and_its_late_results_are_ignored(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("frozen", 1)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"frozen"}, what="registration")
        futures = client.submit_commands(["sleep 0.5; echo $$"] * 3)
        wait_until(lambda: client.status()["tasks"]["running"] >= 1, what="a running task")
        cluster.kill("frozen", signal.SIGSTOP)
        wait_until(lambda: client.status()["lost_executors"] == 1, timeout_s=HEARTBEAT_TIMEOUT_S + 20,
                   what="the frozen executor declared lost")
        cluster.start_executor("thawed-helper", 2)
        results = [f.result(timeout=60) for f in futures]
        assert all(r.ok and r.executor == "thawed-helper" for r in results)
        cluster.kill("frozen", signal.SIGCONT)
        wait_until(lambda: cluster.registered(client) == {"frozen", "thawed-helper"},
                   timeout_s=HEARTBEAT_TIMEOUT_S + 20, what="the thawed executor to register again")
        # Its late result is dropped, by itself (it heard Reregister first) or by the
        # dispatcher (stale attempt): either way no task gets a second result.
        assert client.submit(triple, 4).result(timeout=30) == 12
        assert client.status()["tasks"]["done"] == 4


def test_a_restarted_dispatcher_never_gets_its_predecessors_results(cluster):
    """Task ids restart with the dispatcher: old work must not answer for new tasks."""
    cport, eport = free_port(), free_port()
    cluster.start_dispatcher(cport, eport)
    cluster.start_executor("ex", 2)
    old_client = cluster.client()
    old = old_client.submit_commands(["sleep 1.5; echo OLD"] * 2)
    wait_until(lambda: old_client.status()["tasks"]["running"] == 2, what="two old tasks running")
    cluster.dispatcher.kill()
    cluster.dispatcher.wait()
    cluster.start_dispatcher(cport, eport)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"ex"}, timeout_s=30, what="re-registration")
        new = client.submit_commands([f"sleep 2; echo NEW-{i}" for i in range(2)])
        assert [f.result(timeout=60).stdout for f in new] == ["NEW-0\n", "NEW-1\n"]
    with pytest.raises(falconet.DispatcherUnavailable):
        old[0].result(timeout=30)
    old_client.close()


def big(n):
    return b"x" * n


def test_oversized_tasks_results_and_frames_get_a_clear_error(cluster):
    cluster.start_dispatcher(extra=["--max-message-bytes", str(1 << 20)])
    cluster.start_executor("ex", 2)
    with cluster.client() as client:
        with pytest.raises(ValueError, match="larger than the dispatcher accepts"):
            client.submit(len, b"y" * (2 << 20)).result(timeout=30)
        with pytest.raises(falconet.TaskError, match="larger than the dispatcher accepts"):
            client.submit(big, 2 << 20).result(timeout=30)
        many = [client.submit(big, 100_000) for _ in range(40)]  # 4 MB: several Reports
        assert all(len(f.result(timeout=60)) == 100_000 for f in many)
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(cluster.client_address)
        rogue.send(b"z" * (3 << 20))  # ZeroMQ cuts this peer off
        rogue.close()
        ctx.term()
        assert client.submit(big, 10).result(timeout=30) == b"x" * 10
    assert cluster.dispatcher.poll() is None
