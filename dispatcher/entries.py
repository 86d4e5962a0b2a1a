"""The records the dispatcher keeps: its settings, tasks, executors and client sessions.

Plain slotted objects with no rules of their own; :mod:`falconet.dispatcher.core` changes
them, and the matching, replay and status modules read or build them.
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass

from falconet import needs as nd
from falconet import protocol as p
from falconet.protocol import TaskState

_PENDING = int(TaskState.PENDING)
RESULT_OVERHEAD = 200  #: bytes counted for each unacknowledged result besides its output
_NO_LIMIT = 0.0


@dataclass(frozen=True)
class Config:
    """Dispatcher settings; times in seconds."""

    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    max_submit_batch: int = 100_000  #: tasks in one Submit message
    max_dispatch_batch: int = 2048  #: tasks in one Tasks message
    max_results_batch: int = 4096  #: results in one Results message
    rate_window_s: float = 10.0  #: window of the tasks/s figure
    max_message_bytes: int = 256 << 20  #: ZeroMQ disconnects a peer that sends a larger one
    max_task_bytes: int = 64 << 20  #: a task body larger than this fails at submission
    max_output_bytes: int = 64 << 20  #: a result output larger than this fails the task
    #: a task with needs that could not be placed for this long reserves an executor: it gets
    #: no other work until the task fits, so large tasks never starve behind small ones
    reserve_after_s: float = 1.0
    fail_unschedulable_s: float = 0.0  #: fail tasks unschedulable for this long; 0: keep them queued
    max_classes: int = 10_000  #: distinct sets of needs queued at once (each costs a scan per change)
    #: a client silent this long has its queued tasks cancelled (0: never); a live client with
    #: tasks out speaks every few seconds (falconet.client_session.PING_S)
    client_timeout_s: float = 300.0
    #: the results a client never acknowledged are dropped once it has been silent this long (0: never)
    result_expiry_s: float = 3600.0
    #: bytes of a client's unacknowledged results above which its tasks wait (back-pressure)
    max_unacked_bytes: int = 256 << 20
    #: client name -> share weight (default 1): free slots go round the clients with queued work
    client_weights: tuple[tuple[str, float], ...] = ()


class Task:
    """One accepted task; small on purpose (a queued task is its body plus these slots)."""

    __slots__ = (
        "tid", "client", "seq", "kind", "body", "retries", "walltime_s", "needs", "files",
        "state", "attempt", "losses", "executor", "submitted",
    )  # fmt: skip

    def __init__(self, client, spec: p.TaskSpec, submitted: float, needs: nd.Needs | None = None):
        self.tid = None  # given at first dispatch: a queued task needs none (memory)
        self.client = client
        # One unpacking of the tuple, not six attribute lookups: this runs for every task.
        self.seq, self.kind, self.body, self.retries, walltime_s, _, self.files = spec
        self.walltime_s = walltime_s or _NO_LIMIT  # one shared float for the usual case
        self.needs = needs  # None for a plain task: one cpu, any executor (the fast path)
        self.state = _PENDING
        self.attempt = 0  # number of times dispatched; results must name the current one
        self.losses = 0  # attempts ended by a lost executor (a dead slot fails its task instead)
        self.executor = None
        self.submitted = submitted


class ExecutorState(enum.Enum):
    """Where a registered executor is in its life; legal moves in states.EXECUTOR_TRANSITIONS."""

    ACTIVE = "active"  #: takes work as its credit allows
    DRAINING = "draining"  #: finishing what it runs; gets no new work (it sent Drain, or was released)
    GONE = "gone"  #: lost or said Bye; out of the registry (a later Register makes a new entry)


class ExecutorEntry:
    """A registered executor as the dispatcher knows it."""

    __slots__ = ("peer", "info", "caps", "state", "credit", "tasks", "last_seen", "last_sent", "registered",
                 "completed", "idle_since", "cpus_used", "memory_used", "stats", "ends_at")

    def __init__(self, peer: bytes, info: p.Register, now: float, wall: float):
        self.peer = peer
        self.info = info
        self.caps = caps_of(info)
        self.cpus_used = 0  #: cpus of the tasks it holds (a plain task counts one)
        self.memory_used = 0  #: MB asked by the tasks it holds
        self.stats: dict = {}  #: the executor's last reported statistics (input cache)
        self.state = ExecutorState.ACTIVE
        self.credit = 0
        self.tasks: dict[int, Task] = {}
        self.last_seen = now
        self.last_sent = now
        self.registered = wall
        self.completed = 0
        self.idle_since = now  #: when it last ran out of tasks (for the provisioner's idle release)
        ends_at = info.facts.get("ends_at")  # its allocation's end, less its margin (a batch job)
        self.ends_at = float(ends_at) if type(ends_at) in (int, float) and ends_at > 0 else 0.0


def caps_of(info: p.Register) -> nd.Caps:
    """An executor's capabilities from its registration; odd facts count as none."""
    facts = info.facts
    tags = facts.get("tags")
    tags = [t for t in tags if type(t) is str] if type(tags) is list else []
    site = "cloud" if facts.get("instance_id") else "local"
    tagset = nd.executor_tags(tags, site)
    arch = facts.get("arch")
    try:
        arch = nd.normalise_arch(arch) if type(arch) is str else ""
    except ValueError:
        arch = str(arch)
    return nd.Caps(info.cpus, info.memory_mb, arch, tagset, nd.site_of(tagset))


class ClientEntry:
    """A client session: its identity, name, per-state task counts and undelivered results."""

    __slots__ = ("peer", "name", "label", "counts", "results", "started", "unacked", "welcomed", "batch_high",
                 "batch_extra", "queue", "weight", "deficit", "last_seen", "unacked_bytes", "held")

    def __init__(self, peer: bytes, name: str, *, welcomed: bool = True, now: float = 0.0, weight: float = 1.0):
        self.peer = peer
        self.name = name
        self.label = name or peer[:8].hex()  #: how events and the dashboard name it
        self.queue: collections.deque = collections.deque()  #: its plain tasks (Task), oldest first
        self.weight = weight  #: its share of free slots against the other clients with queued work
        self.deficit = 0.0  #: tasks it may still take in this round of the fair share
        self.last_seen = now  #: monotonic time of its last message
        self.unacked_bytes = 0  #: outputs of its unacknowledged results, plus RESULT_OVERHEAD each
        self.held = False  #: over max_unacked_bytes: its tasks wait until it acknowledges
        self.counts = [0] * len(TaskState)
        self.results: list[p.TaskResult] = []  #: finished this turn, not yet sent
        self.started: list[int] = []  #: seqs that started running this turn, not yet sent
        self.unacked: dict[int, p.TaskResult] = {}  #: sent, kept until the client's Ack
        self.welcomed = welcomed  #: False for a client known only from the journal: it must say Hello
        self.batch_high = 0  #: every batch number from 1 up to this one was accepted
        self.batch_extra: set[int] = set()  #: accepted batch numbers above batch_high

    def first_time(self, batch: int) -> bool:
        """Note batch as accepted; False if it was already (a re-sent Submit)."""
        if 0 < batch <= self.batch_high or batch in self.batch_extra:
            return False
        self.batch_extra.add(batch)
        extra = self.batch_extra
        while self.batch_high + 1 in extra:
            self.batch_high += 1
            extra.remove(self.batch_high)
        return True


KINDS = frozenset(int(k) for k in p.TaskKind)  #: task kinds this dispatcher runs


def invalid_spec(spec: p.TaskSpec, max_body: int) -> str:
    """Why a task spec cannot be queued, or an empty string."""
    if len(spec.body) > max_body:
        return (f"the task is {len(spec.body)} bytes, more than the dispatcher's limit of {max_body} "
                "(--max-task-bytes); pass large data through files or object storage")
    if spec.kind not in KINDS:
        return (f"unknown task kind {spec.kind}: this dispatcher runs "
                + ", ".join(f"{k.name.lower()} ({int(k)})" for k in p.TaskKind))
    if spec.retries < 0:
        return f"retries must be 0 or more, not {spec.retries}"
    if spec.walltime_s < 0 or math.isnan(spec.walltime_s):
        return f"walltime must be 0 (no limit) or positive, not {spec.walltime_s}"
    return ""
