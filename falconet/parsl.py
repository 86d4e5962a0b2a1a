"""falconet as a Parsl executor: Parsl's apps run as falconet Python tasks.

    from parsl.config import Config
    from falconet.parsl import FalconetExecutor
    parsl.load(Config(executors=[FalconetExecutor(slots=4)]))       # an embedded cluster
    parsl.load(Config(executors=[FalconetExecutor(address="tcp://10.0.0.5:5555")]))

Parsl hands the executor a function and its arguments, already wrapped so that the app's
exception comes back as a value (``RemoteExceptionWrapper``); a bash app is such a
function too, running its command line in the slot.  Each becomes one falconet Python
task, and the TaskFuture is the Future Parsl waits on.

A ``parsl_resource_specification`` maps onto a task's needs (see :func:`task_options`).
Import this module only with Parsl installed (``pip install '.[parsl]'``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from parsl.executors.base import ParslExecutor
from parsl.executors.errors import InvalidResourceSpecification
from parsl.monitoring.radios.base import RadioConfig
from parsl.monitoring.radios.filesystem import FilesystemRadio
from parsl.utils import RepresentationMixin

from falconet import needs as nd
from falconet.client import DEFAULT_RETRIES, Client, TaskFuture
from falconet.local import LocalCluster

log = logging.getLogger("falconet.parsl")

#: Parsl's usual keys (those of its Work Queue and TaskVine executors) and falconet's own.
PARSL_KEYS = frozenset({"cores", "memory", "disk", "running_time_min"})
FALCONET_KEYS = frozenset({"tags", "where", "arch", "prefer"})
STOP_TIMEOUT_S = 5.0  #: an embedded cluster's executors get this long to drain after shutdown()
#: ... and this long when shutdown() abandoned running tasks: their results would go nowhere
ABANDON_TIMEOUT_S = 1.0


def task_options(spec: dict[str, Any] | None) -> dict[str, Any]:
    """submit_python keywords from a parsl_resource_specification; raises
    InvalidResourceSpecification for an unknown key or a bad value.

    cores -> cpus, memory (MB) -> memory, running_time_min -> walltime_s (the task is
    killed past it); tags, where, arch, prefer as falconet has them.  disk is accepted and
    not enforced: executors do not report their free disk (docs/engines.md).
    """
    if not spec:
        return {}
    unknown = set(spec) - PARSL_KEYS - FALCONET_KEYS
    if unknown:
        raise InvalidResourceSpecification(
            unknown, f"the falconet executor takes {', '.join(sorted(PARSL_KEYS | FALCONET_KEYS))}")
    placement = {k: spec[k] for k in FALCONET_KEYS if k in spec}
    if "cores" in spec:
        placement["cpus"] = spec["cores"]
    if "memory" in spec:
        placement["memory"] = spec["memory"]
    try:
        nd.make(**placement)  # the one check of values, so a bad one fails at submit
    except (TypeError, ValueError) as exc:
        raise InvalidResourceSpecification(set(spec) & (PARSL_KEYS | FALCONET_KEYS), str(exc)) from None
    options: dict[str, Any] = dict(placement)  # defaults (memory=0, cores=1) still make a plain task
    if "running_time_min" in spec:
        minutes = spec["running_time_min"]
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes < 0:
            raise InvalidResourceSpecification(
                {"running_time_min"}, f"running_time_min is minutes, 0 or more, not {minutes!r}")
        options["walltime_s"] = float(minutes) * 60.0
    return options


class FalconetExecutor(ParslExecutor, RepresentationMixin):
    """A Parsl executor whose tasks run on falconet executors.

    address: a dispatcher's client address (tcp://HOST:PORT); None starts an embedded
    cluster at start() (a dispatcher and `local_executors` executors of `slots` slots on
    this machine, its logs in the run directory) and stops it at shutdown().
    dispatcher_key, key: as for falconet.Client (a dispatcher started with --keys).
    retries: how often a task lost with its executor runs again (Parsl's own retries
    are for apps that fail).
    remote_monitoring_radio: how tasks report to Parsl's monitoring; by default files in
    the run directory, which embedded and shared-filesystem executors can write; use
    Parsl's UDPRadio for executors elsewhere.
    """

    def __init__(self, label: str = "falconet", address: str | None = None, slots: int | None = None,
                 local_executors: int = 1, dispatcher_key: str | None = None, key: str | None = None,
                 retries: int = DEFAULT_RETRIES, storage_access: list[Any] | None = None,
                 working_dir: str | None = None, remote_monitoring_radio: RadioConfig | None = None):
        super().__init__()
        self.label = label
        self.address = address
        self.slots = slots
        self.local_executors = local_executors
        self.dispatcher_key = dispatcher_key
        self.key = key
        self.retries = retries
        self.storage_access = storage_access
        self.working_dir = working_dir
        self.remote_monitoring_radio = remote_monitoring_radio or FilesystemRadio()
        self.client: Client | None = None
        self.cluster: LocalCluster | None = None
        self._futures: dict[int, TaskFuture] = {}  # unfinished tasks, by falconet sequence number
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the embedded cluster (with no address) and connect to the dispatcher."""
        address = self.address
        if address is None:
            log_dir = os.path.join(self.run_dir, self.label)
            os.makedirs(log_dir, exist_ok=True)
            self.cluster = LocalCluster(self.slots, self.local_executors, log_dir=log_dir)
            address = self.cluster.client_address
        try:
            self.client = Client(address, name=f"parsl-{self.label}", retries=self.retries,
                                 dispatcher_key=self.dispatcher_key, key=self.key)
        except BaseException:
            self._stop_cluster()
            raise
        log.info("falconet executor %s connected to %s", self.label, address)

    def submit(self, func: Callable, resource_specification: dict[str, Any], *args: Any, **kwargs: Any) -> Future:
        """Run func(*args, **kwargs) as one falconet task; the future is Parsl's exec future."""
        if self.client is None:
            raise RuntimeError(f"the falconet executor {self.label} is not started (or was shut down)")
        options = task_options(resource_specification)
        fut = self.client.submit_python(func, args, kwargs, **options)
        fut.parsl_executor_task_id = fut.seq  # type: ignore[attr-defined]
        with self._lock:
            self._futures[fut.seq] = fut
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._futures.pop(fut.seq, None)  # type: ignore[attr-defined]

    @property
    def outstanding(self) -> int:
        """Tasks submitted through this executor that have not finished."""
        with self._lock:
            return len(self._futures)

    @property
    def connected_workers(self) -> int:
        """Executors connected to the dispatcher (falconet executors, not slots)."""
        if self.client is None:
            return 0
        return int(self.client.status(detail=False).get("executors", 0))

    def shutdown(self) -> None:
        """Cancel what has not finished, disconnect, and stop an embedded cluster."""
        client, self.client = self.client, None
        unfinished: list[TaskFuture] = []
        if client is not None:
            with self._lock:
                unfinished = list(self._futures.values())
            for fut in unfinished:
                fut.cancel()  # not started: dropped by the dispatcher; running: its result is ignored
            client.close(cancel=True, wait=False)  # what still runs is abandoned, not awaited
        self._stop_cluster(ABANDON_TIMEOUT_S if unfinished else STOP_TIMEOUT_S)
        super().shutdown()

    def _stop_cluster(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Drain and stop the embedded cluster; what still runs after timeout_s is killed."""
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.stop(timeout_s=timeout_s)
