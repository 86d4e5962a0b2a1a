"""An embedded cluster: a dispatcher and executors as child processes of this one.

They are real processes talking ZeroMQ over loopback, the same programs as
``falconet dispatcher`` and ``falconet executor``.  Each child watches this process and
leaves when it is gone, so a killed script leaks nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from falconet import spawn
from falconet.client import Client
from falconet.errors import FalconetError

log = logging.getLogger("falconet")
AT_ONCE_S = 0.001  #: --fail-unschedulable of a cluster with executors: the first check fails them


class LocalCluster:
    """Start a dispatcher on 127.0.0.1 and `executors` executors with `slots` slots each."""

    def __init__(self, slots: int | None = None, executors: int = 1, *,
                 heartbeat_interval_s: float = 1.0, heartbeat_timeout_s: float = 10.0,
                 log_dir: str | None = None, start_timeout_s: float = 30.0,
                 host: str = "127.0.0.1", insecure: bool = False, fail_unschedulable_s: float | None = None,
                 dashboard: bool = False):
        """fail_unschedulable_s: fail tasks no executor here can run after this long (default:
        at once when the cluster has executors of its own, as no other will join; else never).
        dashboard: serve the live dashboard and /metrics on a free loopback port, at
        dashboard_url (else dashboard_url is "")."""
        self.slots = slots or os.cpu_count() or 1
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="falconet-local-")
        self.own_log_dir = log_dir is None  #: removed by a clean stop(), kept after a failure
        self.dispatcher: subprocess.Popen | None = None
        self.executors: list[subprocess.Popen] = []
        self.slots_of: list[int] = []  #: slots of each executor started here
        self.dashboard_url = ""  #: the dispatcher's HTTP side, with dashboard=True
        try:
            extra = ["--host", host] + (["--insecure"] if insecure else [])
            if dashboard:
                extra += ["--http-port", "0"]
            if fail_unschedulable_s is None:
                fail_unschedulable_s = AT_ONCE_S if executors else 0.0
            extra += ["--fail-unschedulable", str(fail_unschedulable_s)]
            self._start_dispatcher(heartbeat_interval_s, heartbeat_timeout_s, start_timeout_s, extra)
            for i in range(executors):
                self.add_executor(name=f"executor-{i}")
        except BaseException:
            self.stop(keep_logs=True)
            raise

    def _spawn(self, name: str, args: list[str], stdout: int | None = None) -> subprocess.Popen:
        return start_child(self.log_dir, name, args, stdout)

    def _start_dispatcher(self, interval_s: float, timeout_s: float, start_timeout_s: float,
                          extra: list[str]) -> None:
        self.dispatcher = self._spawn("dispatcher", [
            "dispatcher", "--client-port", "0", "--executor-port", "0",
            "--heartbeat-interval", str(interval_s), "--heartbeat-timeout", str(timeout_s), *extra,
        ], stdout=subprocess.PIPE)
        wanted = ("client", "executor", "http") if "--http-port" in extra else ("client", "executor")
        found = read_lines(self.dispatcher, wanted, "dispatcher", self.log_dir, start_timeout_s)
        self.client_address, self.executor_address = found["client"], found["executor"]
        self.dashboard_url = found.get("http", "")

    def add_executor(self, slots: int | None = None, name: str | None = None,
                     extra: list[str] | None = None) -> subprocess.Popen:
        """Start one more executor process."""
        name = name or f"executor-{len(self.executors)}"
        proc = self._spawn(name, [
            "executor", "--dispatcher", self.executor_address, "--slots", str(slots or self.slots),
            *(extra or []),
        ])
        self.executors.append(proc)
        self.slots_of.append(slots or self.slots)
        return proc

    def wait_for_slots(self, client: Client, timeout_s: float = 30.0) -> None:
        """Return once the executors started here have registered with the dispatcher."""
        want = sum(self.slots_of)
        deadline = time.monotonic() + timeout_s
        while client.slots(max_age_s=0.0) < want:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.executors):
                raise FalconetError(f"the local executors did not register within {timeout_s:g}s; "
                                    f"see the logs in {self.log_dir}")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 10.0, keep_logs: bool = False) -> None:
        """Drain the executors (SIGTERM), then stop the dispatcher; SIGKILL what lingers.

        The log folder this cluster made is removed, unless keep_logs or a child had
        already died by itself: then it is kept and its path logged.
        """
        children = [self.dispatcher, *self.executors] if self.dispatcher else self.executors
        crashed = [p for p in children if p.poll() not in (None, 0)]
        procs = [p for p in self.executors if p.poll() is None]
        _signal_all(procs, signal.SIGTERM)
        _wait_all(procs, timeout_s)
        if self.dispatcher is not None and self.dispatcher.poll() is None:
            _signal_all([self.dispatcher], signal.SIGTERM)
            _wait_all([self.dispatcher], timeout_s)
        if self.dispatcher is not None and self.dispatcher.stdout:
            self.dispatcher.stdout.close()
        settle_logs(self.log_dir, self.own_log_dir, keep=keep_logs or bool(crashed))

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # On an error or Ctrl-C, do not linger; keep the logs of an error.
        self.stop(timeout_s=2.0 if exc_type else 10.0, keep_logs=failed(exc_type))


def failed(exc_type: type[BaseException] | None) -> bool:
    """Whether a with block left by this exception failed (Ctrl-C and SIGTERM are no failure)."""
    return exc_type is not None and not issubclass(exc_type, (KeyboardInterrupt, GeneratorExit))


def settle_logs(log_dir: str, own: bool, keep: bool) -> None:
    """Remove a log folder we made, or say where it is kept."""
    if not own:
        return
    if keep:
        log.warning("the local cluster's logs are kept in %s", log_dir)
    else:
        shutil.rmtree(log_dir, ignore_errors=True)


def start_child(log_dir: str, name: str, args: list[str], stdout: int | None = None) -> subprocess.Popen:
    """Start `falconet ARGS` as a child that leaves when this process is gone; log in log_dir."""
    out = open(os.path.join(log_dir, f"{name}.log"), "ab")  # noqa: SIM115 - handed to the child
    cmd = spawn.falconet(*args, "--parent-pid", str(os.getpid()))
    try:
        # Its own session: a Ctrl-C meant for this program must not kill the children
        # before they can drain; stop() ends them in order.
        return subprocess.Popen(cmd, stdout=stdout or out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        out.close()


def read_lines(proc: subprocess.Popen, keys: tuple[str, ...], name: str, log_dir: str,
               timeout_s: float) -> dict[str, str]:
    """Read the 'key: value' lines a child prints once it is up."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < len(keys):
        line = proc.stdout.readline().decode()  # type: ignore[union-attr]
        if not line or time.monotonic() > deadline:
            raise FalconetError(f"the {name} did not start: {_last_error(log_dir, name)}")
        key, _, value = line.strip().partition(": ")
        if key in keys:
            found[key] = value
    return found


def _last_error(log_dir: str, name: str) -> str:
    """The child's last 'error:' line, or where its log is."""
    path = os.path.join(log_dir, f"{name}.log")
    try:
        with open(path, errors="replace") as fh:
            errors = [ln.strip() for ln in fh if ln.startswith("error:")]
    except OSError:
        errors = []
    return errors[-1].removeprefix("error: ") if errors else f"see {path}"


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            spawn.signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def local(slots: int | None = None, executors: int = 1, *, dashboard: bool = False,
          **client_options: Any) -> Iterator[Client]:
    """An embedded dispatcher with local executors, and a Client connected to it once they
    have registered (so ``client.slots()`` counts them all from the start).

    Leaving the block waits for the tasks submitted, as ``concurrent.futures`` executors
    do; leaving it by an exception cancels those not started instead.  With dashboard=True
    the dispatcher serves its live dashboard and /metrics on a free loopback port, and the
    client's ``dashboard_url`` says where.
    """
    with LocalCluster(slots, executors, dashboard=dashboard) as cluster, \
            session(cluster.client_address, **client_options) as client:
        client.dashboard_url = cluster.dashboard_url
        cluster.wait_for_slots(client)
        yield client


@contextlib.contextmanager
def session(address: str, **client_options: Any) -> Iterator[Client]:
    """A Client that cancels its unfinished tasks when the block is left by an exception."""
    client = Client(address, **client_options)
    try:
        yield client
    except BaseException:
        client.close(cancel=True, wait=False)
        raise
    finally:
        client.close()
