"""Helpers for integration tests: real processes on random loopback ports, wait_until."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import falconet
from falconet import spawn

HEARTBEAT_INTERVAL_S = 0.2
HEARTBEAT_TIMEOUT_S = 2.0


def wait_until(predicate: Callable[[], object], timeout_s: float = 30.0, what: str = "condition") -> object:
    """Poll predicate until it is true; fail the test with `what` if it never is."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a dispatcher restarted in place)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dealer(ctx, address: str, curve=None):
    """A raw DEALER on address (a CURVE client when curve=(server_public, (public, secret)))."""
    import zmq

    from falconet import keys

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        keys.client_socket(sock, *curve)
    sock.connect(address)
    return sock


def stop_processes(procs) -> None:
    """SIGKILL each process's group, reap it and close its stdout pipe."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def read_logs(log_dir: Path) -> str:
    """The tail of every *.log in log_dir, each under its name."""
    return "\n".join(f"----- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                     for p in sorted(log_dir.glob("*.log")))


def read_addresses(dispatcher: subprocess.Popen) -> tuple[str, str]:
    """The (client, executor) addresses a dispatcher prints on its first two lines."""
    lines = [dispatcher.stdout.readline().decode().strip() for _ in range(2)]
    found = dict(line.split(": ", 1) for line in lines if ": " in line)
    assert set(found) == {"client", "executor"}, f"dispatcher printed {lines!r}"
    return found["client"], found["executor"]


class LeavingClient(falconet.Client):
    """A client whose block, when left, cancels what has not started and does not wait.

    These tests leave work behind on purpose (tasks no executor can run, fleets being torn
    down); a plain Client waits for it, as tests/integration/test_futures_conformance.py
    checks.
    """

    def __exit__(self, *exc) -> None:
        self.close(cancel=True, wait=False)


class Cluster:
    """A dispatcher process and executor processes, each in its own process group."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.dispatcher: subprocess.Popen | None = None

    def _spawn(self, name: str, args: list[str], **kw) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen([*spawn.falconet(), *args], stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                stdout=kw.pop("stdout", log), **kw)
        log.close()
        self.procs[name] = proc
        return proc

    def start_dispatcher(self, client_port: int = 0, executor_port: int = 0, extra: tuple = ()) -> None:
        self.dispatcher = self._spawn("dispatcher", [
            "dispatcher", "--client-port", str(client_port), "--executor-port", str(executor_port),
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL_S),
            "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--log-level", "debug", *extra,
        ], stdout=subprocess.PIPE)
        self.client_address, self.executor_address = read_addresses(self.dispatcher)
        if "--http-port" in extra:  # its third line: 'http: URL'
            line = self.dispatcher.stdout.readline().decode().strip()
            assert line.startswith("http: "), f"dispatcher printed {line!r}"
            self.http_url = line.removeprefix("http: ")

    def start_executor(self, name: str, slots: int = 2, *extra: str, dispatcher: str = "") -> subprocess.Popen:
        """An executor of this dispatcher (or of another address, to test mistakes)."""
        return self._spawn(name, ["executor", "--dispatcher", dispatcher or self.executor_address,
                                  "--slots", str(slots), "--id", name, "--log-level", "debug", *extra])

    def log(self, name: str) -> str:
        """What a process has written to its log so far."""
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def client(self, **kw) -> falconet.Client:
        return LeavingClient(self.client_address, **kw)

    def registered(self, client: falconet.Client) -> set[str]:
        return {row["id"] for row in client.status(detail=True)["executor_table"]}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.kill(self.procs[name].pid, sig)

    def stop(self) -> None:
        stop_processes(self.procs.values())

    def logs(self) -> str:
        return read_logs(self.log_dir)
