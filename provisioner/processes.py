"""The local backend: executor processes on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

import psutil

from falconet import spawn
from falconet.needs import machine_arch
from falconet.provisioner.backend import Machine
from falconet.provisioner.policy import InstanceType


class LocalBackend:
    """Starts `falconet executor` processes; each one is a node of `slots` slots."""

    name = "local"

    def __init__(self, executor_address: str, slots: int | None = None, log_dir: str | None = None,
                 executor_args: tuple[str, ...] = (), tags: tuple[str, ...] = ()):
        self.executor_address = executor_address
        self.slots = slots or os.cpu_count() or 1
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="falconet-provisioner-")
        self.executor_args = (*executor_args, *(arg for t in tags for arg in ("--tag", t)))
        self.procs: dict[str, tuple[subprocess.Popen, Machine]] = {}
        self._type = InstanceType("local", vcpus=self.slots, memory_mb=psutil.virtual_memory().total >> 20,
                                  arch=machine_arch(), price_per_hour=0.0, tags=frozenset(tags), site="local")
        self._calls = {"start": 0, "stop": 0}

    def types(self) -> tuple[InstanceType, ...]:
        return (self._type,)

    def list(self) -> list[Machine]:
        for mid, (proc, _) in list(self.procs.items()):
            if proc.poll() is not None:  # it left (drained, idle or killed)
                del self.procs[mid]
        return [m for _, m in self.procs.values()]

    def start(self, itype: InstanceType, count: int, token: str) -> list[Machine]:
        self._calls["start"] += 1
        started = []
        for i in range(count):
            mid = f"local-{token}-{i}"
            if mid in self.procs:
                continue  # the same token never starts twice
            log = open(os.path.join(self.log_dir, f"{mid}.log"), "ab")  # noqa: SIM115 - the child's
            try:
                proc = subprocess.Popen(
                    spawn.falconet("executor", "--dispatcher", self.executor_address,
                     "--slots", str(self.slots), "--cpus", str(self.slots), "--id", mid,
                     "--parent-pid", str(os.getpid()),
                     *self.executor_args),
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
            finally:
                log.close()
            m = Machine(mid, itype.name, "running", time.time(), token)
            self.procs[mid] = (proc, m)
            started.append(m)
        return started

    def stop(self, ids: list[str]) -> None:
        self._calls["stop"] += 1
        for mid in ids:
            entry = self.procs.pop(mid, None)
            if entry is None:
                continue
            proc = entry[0]
            spawn.signal_group(proc.pid, signal.SIGKILL)  # the executor and its slots
            proc.wait()

    def api_calls(self) -> dict[str, int]:
        return dict(self._calls)
