"""An elastic fleet in one call: a dispatcher and a provisioner that grows executors on demand.

    import falconet
    with falconet.provision("ec2", ami="name:falconet-executor-*", instance_types="c5.large",
                            max_executors=32, host="10.0.1.5", insecure=True) as client:
        results = list(client.map(simulate, range(10_000)))

Keyword options are the ``falconet provisioner`` command's, with underscores
(``max_executors=32``, ``security_group=["sg-1", "sg-2"]``, ``spot=True``).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

from falconet import address
from falconet.client import Client
from falconet.local import (
    LocalCluster,
    _signal_all,
    _wait_all,
    failed,
    read_lines,
    session,
    settle_logs,
    start_child,
)


class ElasticCluster:
    """A provisioner child process for a dispatcher: an embedded one, or `dispatcher` if given."""

    def __init__(self, backend: str = "local", *, dispatcher: str | None = None,
                 host: str = "127.0.0.1", insecure: bool = False, log_dir: str | None = None,
                 start_timeout_s: float = 60.0, dashboard: bool = False, **options: Any):
        if dispatcher is not None:
            dispatcher = address.parse(dispatcher).url  # AddressError here, not in the child's log
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="falconet-elastic-")
        self.own_log_dir = log_dir is None  #: removed by a clean stop(), kept after a failure
        self.local: LocalCluster | None = None
        self.provisioner: subprocess.Popen | None = None
        self.stop_grace_s = float(options.get("stop_grace", 30.0))
        try:
            if dispatcher is None:
                self.local = LocalCluster(executors=0, host=host, insecure=insecure, log_dir=self.log_dir,
                                          dashboard=dashboard)
            #: the embedded dispatcher's dashboard (dashboard=True), else ""
            self.dashboard_url = self.local.dashboard_url if self.local is not None else ""
            self.client_address = dispatcher or self.local.client_address  # type: ignore[union-attr]
            self.provisioner = start_child(self.log_dir, "provisioner", [
                "provisioner", "--dispatcher", self.client_address, "--backend", backend,
                *command_line(options)], stdout=subprocess.PIPE)
            read_lines(self.provisioner, ("provisioner",), "provisioner", self.log_dir, start_timeout_s)
        except BaseException:
            self.stop(keep_logs=True)
            raise

    def stop(self, keep_logs: bool = False) -> None:
        """Stop the provisioner (it drains and stops its fleet), then the embedded dispatcher.

        The log folder this made is removed unless keep_logs or the provisioner had died.
        """
        proc = self.provisioner
        keep_logs = keep_logs or (proc is not None and proc.poll() not in (None, 0))
        if proc is not None and proc.poll() is None:
            _signal_all([proc], signal.SIGTERM)
            _wait_all([proc], self.stop_grace_s + 30)
        if proc is not None and proc.stdout:
            proc.stdout.close()
        if self.local is not None:
            self.local.stop(keep_logs=keep_logs)
        settle_logs(self.log_dir, self.own_log_dir, keep=keep_logs)

    def __enter__(self) -> ElasticCluster:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.stop(keep_logs=failed(exc_type))


def command_line(options: dict[str, Any]) -> list[str]:
    """Keyword options as `falconet provisioner` arguments."""
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            for v in value:
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    return args


@contextlib.contextmanager
def provision(backend: str = "local", *, dispatcher: str | None = None, client_name: str = "",
              **options: Any) -> Iterator[Client]:
    """A Client on a fleet that grows with its queue and shrinks when idle; stopped on exit."""
    with ElasticCluster(backend, dispatcher=dispatcher, **options) as cluster, \
            session(cluster.client_address, name=client_name) as client:
        client.dashboard_url = cluster.dashboard_url
        yield client
