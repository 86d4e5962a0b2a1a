"""Address, port and key mistakes, end to end: one clear line, never a traceback or a silent wait.

Real dispatchers and executors on 127.0.0.1; the CLI as a person runs it.  Every wait is
bounded by a timeout, and the checks on time are far below the timeouts the old behaviour
would have hit.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cluster_helpers import free_port, wait_until

import falconet
from falconet import keys, spawn
from falconet.executor import agent
from falconet.link import Link

BAD = "127.0.0.1:5555"
BAD_LINE = ("'127.0.0.1:5555' is not an address falconet can use: write tcp://HOST:PORT, "
            "such as tcp://127.0.0.1:5555\n")


def falconet_cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*spawn.falconet(), *args], capture_output=True, text=True, timeout=timeout, **kw)


def port_of(address: str) -> str:
    return address.rpartition(":")[2]


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    keys.init(tmp_path / "keys")
    return tmp_path / "keys"


# --- malformed addresses ---------------------------------------------------------------------


@pytest.mark.parametrize(("args", "option"), [
    (("executor", "--dispatcher", BAD), "--dispatcher"),
    (("status", "--dispatcher", BAD), "--dispatcher"),
    (("executors", "--dispatcher", BAD), "--dispatcher"),
    (("submit", "--dispatcher", BAD, "true"), "--dispatcher"),
    (("run", "TASKS", "--dispatcher", BAD), "--dispatcher"),
    (("provisioner", "--dispatcher", BAD), "--dispatcher"),
    (("provisioner", "--dispatcher", "tcp://127.0.0.1:9", "--executor-address", BAD), "--executor-address"),
])
def test_an_address_without_tcp_is_one_line_and_a_usage_error(tmp_path, args, option):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("true\n")
    res = falconet_cli(*[str(tasks) if a == "TASKS" else a for a in args])
    assert (res.returncode, res.stderr) == (2, f"error: {option}: {BAD_LINE}")


@pytest.mark.parametrize(("address", "why"), [
    ("localhost", "it has no port"),
    ("tcp://host", "it has no port"),
    ("tcp://127.0.0.1:70000", "port 70000 is not between 1 and 65535"),
])
def test_an_executor_given_a_broken_address_says_why_in_one_line(address, why):
    res = falconet_cli("executor", "--dispatcher", address)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"error: --dispatcher: {address!r} is not an address falconet can use: {why}")


def test_an_address_from_the_environment_names_the_variable():
    res = falconet_cli("executor", env={"FALCONET_EXECUTOR_DISPATCHER": BAD, "PATH": "/usr/bin:/bin"})
    assert (res.returncode, res.stderr) == (2, f"error: FALCONET_EXECUTOR_DISPATCHER: {BAD_LINE}")


def test_the_python_api_refuses_a_broken_address_at_once():
    started = time.monotonic()
    with pytest.raises(falconet.AddressError) as info:
        falconet.Client(BAD, connect_timeout_s=30)
    assert str(info.value) + "\n" == BAD_LINE
    with pytest.raises(falconet.AddressError, match="it has no port"):
        agent.Executor(agent.ExecutorConfig(dispatcher="tcp://localhost", slots=1))
    assert time.monotonic() - started < 5, "no connection was tried"


# --- the wrong port ----------------------------------------------------------------------------


def test_an_executor_on_the_client_port_is_told_which_port_it_needs(cluster):
    cluster.start_dispatcher()
    proc = cluster.start_executor("lost", 1, dispatcher=cluster.client_address)
    assert proc.wait(timeout=30) == 1
    assert (f"ERROR {cluster.client_address} is the dispatcher's client port; executors connect to its "
            f"executor port, {port_of(cluster.executor_address)} (the 'executor:' line falconet dispatcher "
            "prints)\n") in cluster.log("lost")


def test_a_client_on_the_executor_port_is_told_which_port_it_needs(cluster):
    cluster.start_dispatcher()
    line = (f"{cluster.executor_address} is the dispatcher's executor port; clients connect to its client "
            f"port, {port_of(cluster.client_address)} (the 'client:' line falconet dispatcher prints)")
    started = time.monotonic()
    with pytest.raises(falconet.RefusedError) as info:
        falconet.Client(cluster.executor_address, connect_timeout_s=30)
    assert str(info.value) == line and time.monotonic() - started < 10, "answered, not timed out"
    res = falconet_cli("status", "--dispatcher", cluster.executor_address)
    assert (res.returncode, res.stderr) == (1, f"error: {line}\n")


# --- keys ----------------------------------------------------------------------------------------


def test_a_client_without_keys_is_told_about_keys_at_once(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    res = falconet_cli("status", "--dispatcher", cluster.client_address)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert res.stderr.startswith(
        f"error: cannot connect to {cluster.client_address}: the security handshake failed, so the dispatcher "
        "was probably started with --keys: give --dispatcher-key (its dispatcher.key) and --key")


def test_a_client_whose_key_is_not_authorised_is_told_so_at_once(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    started = time.monotonic()
    with pytest.raises(falconet.DispatcherUnavailable) as info:
        falconet.Client(cluster.client_address, connect_timeout_s=30,
                        dispatcher_key=str(keydir / "dispatcher.key"), key=str(keydir / "executor.key_secret"))
    assert time.monotonic() - started < 10, "told at once, not after the connect timeout"
    assert str(info.value).startswith(f"cannot connect to {cluster.client_address}: the dispatcher refused "
                                      "this client's key: it is not in its authorized/clients folder")


def test_an_executor_that_cannot_register_says_why_in_its_log(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    executor_key = ("--dispatcher-key", str(keydir / "dispatcher.key"), "--key")
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    cluster.start_executor("no-keys", 1)
    cluster.start_executor("client-key", 1, *executor_key, str(keydir / "client.key_secret"))
    cluster.start_executor("nowhere", 1, dispatcher=nowhere)
    expected = {
        "no-keys": (cluster.executor_address, "the security handshake failed, so the dispatcher was probably "
                                              "started with --keys: give --dispatcher-key"),
        "client-key": (cluster.executor_address, "the dispatcher refused this executor's key: it is not in "
                                                 "its authorized/executors folder"),
        "nowhere": (nowhere, "nothing accepts connections there: is the dispatcher running"),
    }
    for name, (address, why) in expected.items():
        pattern = re.compile(rf"WARNING still not registered with {re.escape(address)} after \d+s: {re.escape(why)}")
        wait_until(lambda n=name, p=pattern: p.search(cluster.log(n)), timeout_s=30, what=f"{name}'s complaint")
    for name in expected:
        assert cluster.log(name).count("still not registered") == 1, "the next one comes 30 s later"


# --- the executor's complaints, with its clock in the test's hands --------------------------------


def _executor(address: str, **config) -> agent.Executor:
    return agent.Executor(agent.ExecutorConfig(dispatcher=address, slots=1, **config))


def _close(ex: agent.Executor) -> None:
    ex.link.close()
    ex.sock.close(linger=0)
    ex.ctx.term()
    shutil.rmtree(ex.temp_root, ignore_errors=True)


def _turn_at(ex: agent.Executor, now: float) -> None:
    """One turn's rules with the executor's clock reading `now` (no poll)."""
    ex.pull.clock = lambda: now
    ex._end_turn()


def test_complaints_come_after_five_seconds_then_every_thirty(caplog):
    ex = _executor(f"tcp://127.0.0.1:{free_port()}")
    try:
        t0 = ex.pull.unregistered_since
        with caplog.at_level(logging.WARNING, logger="falconet.executor"):
            for dt in (0.0, 1.0, 4.9, 5.0, 5.1, 20.0, 34.9, 35.0, 36.0, 64.9, 65.0):
                caplog.clear()
                _turn_at(ex, t0 + dt)
                said = [r.getMessage() for r in caplog.records if "still not registered" in r.getMessage()]
                assert len(said) == (dt in (5.0, 35.0, 65.0)), (dt, said)
        assert said[0].startswith(f"still not registered with {ex.target.url} after 65s: ")
    finally:
        _close(ex)


def test_an_executor_whose_key_was_refused_gets_in_once_it_is_authorised(cluster, keydir):
    cluster.start_dispatcher(extra=("--keys", str(keydir)))
    creds = keys.credentials(str(keydir / "dispatcher.key"), str(keydir / "client.key_secret"))
    ex = _executor(cluster.executor_address, credentials=creds)
    try:
        wait_until(lambda: ex.link.update() is Link.KEY_REFUSED, timeout_s=30, what="the refusal")
        authorised = keys.authorized_dir(keydir, "executor") / "late-client.key"
        shutil.copyfile(keydir / "client.key", authorised)
        _turn_at(ex, ex.pull.next_complaint)  # complains, and connects again: libzmq would not
        wait_until(lambda: ex.link.update() is Link.UP, timeout_s=30, what="the key let in")
    finally:
        _close(ex)
