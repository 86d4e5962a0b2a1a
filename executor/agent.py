"""The executor: connects out to the dispatcher, pulls work with credit, runs it in slots.

One thread, one ZeroMQ DEALER socket and one pipe pair per slot, all in one poll loop.
The executor never listens on a port.  It asks for as many tasks as it can start now plus
a prefetch sized to cover about ten milliseconds of work at the measured task rate, hands
tasks to idle slots in chunks sized to about two milliseconds of work (one task at a time
when tasks are long or have a wall-time limit), and reports starts, results and new
credit together in one message per turn.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

from falconet import address as addresses
from falconet import link, spawn, staging
from falconet import protocol as p
from falconet.errors import FalconetError, ProtocolError
from falconet.executor import host, pipes
from falconet.executor.workspace import InputCache

log = logging.getLogger("falconet.executor")

_FAILED, _CANCELLED = int(p.TaskState.FAILED), int(p.TaskState.CANCELLED)
CHUNK_WORK_S = 0.002  # work per chunk handed to a slot
BACKLOG_WORK_S = 0.01  # work held locally beyond the slots
MAX_CHUNK = 64
MAX_BACKLOG = 1024
MAX_REPORT = 4096  # results per Report message
PIPELINE_BELOW_S = 0.05  # mean task time under which slots get their next chunk early
COMMAND_GRACE_S = 5.0  # a command's own slot enforces its wall time; this is the backstop
FIRST_COMPLAINT_S = 5.0  # not registered after this long: say why in the log...
COMPLAINT_EVERY_S = 30.0  # ...and again this often while it lasts


@dataclass(frozen=True)
class ExecutorConfig:
    """How an executor runs; times in seconds."""

    dispatcher: str  #: the dispatcher's executor address, tcp://host:port
    slots: int = field(default_factory=host.cpus)
    idle_timeout_s: float = 0.0  #: leave after this long without work; 0 = never
    prefetch: int | None = None  #: tasks held beyond the slots; None = sized automatically
    executor_id: str = ""  #: default: hostname and a random suffix
    facts: dict = field(default_factory=dict)  #: extra facts for the registration
    poll_s: float = 0.1
    credentials: Any = None  #: falconet.keys.Credentials for a dispatcher with --keys
    cpus: int = 0  #: cpus offered to tasks; 0: the CPUs this process may use
    memory_mb: int = 0  #: memory offered to tasks; 0: the machine's
    tags: tuple[str, ...] = ()  #: what tasks may ask for (gpu, site=cloud...); site= is added
    work_dir: str = ""  #: private task directories, the input cache and outputs; "": a temp dir
    cache_mb: int = 10_240  #: input cache size bound


class Phase(enum.Enum):
    """Where the executor is in its life."""

    ACTIVE = "active"  #: taking and running work (registered or trying to be)
    DRAINING = "draining"  #: finishing what runs; handed the rest back
    DONE = "done"  #: leaving the loop


class Slot:
    """One slot process and the chunk of tasks it was handed, in order."""

    def __init__(self, index: int, staging_args: tuple[str, ...] = ()):
        self.index = index
        self.staging_args = staging_args  #: work root, cache dir, cache bytes, outbox
        self.proc: subprocess.Popen | None = None
        self.rfd = self.wfd = -1
        self.reader = pipes.FrameReader()
        self.chunk: dict[int, p.Assignment] = {}
        self.sent_at = 0.0

    @property
    def cpus(self) -> int:
        """cpus held by the task it runs: chunks are of one-cpu tasks, others go alone."""
        for a in self.chunk.values():
            return a.cpus
        return 0

    def start(self) -> None:
        to_slot_r, to_slot_w = os.pipe()
        from_slot_r, from_slot_w = os.pipe()
        self.proc = subprocess.Popen(
            spawn.module("falconet.executor.slot", str(to_slot_r), str(from_slot_w),
                         str(os.getpid()), *self.staging_args),
            pass_fds=(to_slot_r, from_slot_w), stdin=subprocess.DEVNULL, start_new_session=True,
        )
        os.close(to_slot_r)
        os.close(from_slot_w)
        os.set_blocking(from_slot_r, False)
        self.rfd, self.wfd = from_slot_r, to_slot_w
        self.reader = pipes.FrameReader()

    def close(self, kill: bool = False) -> int | None:
        """Close the pipes; kill the process group if asked; return the exit status."""
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.wfd = -1
        if self.proc is None:
            return None
        if kill:  # SIGTERM first: the slot kills its running command's group, then exits
            spawn.signal_group(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=1 if kill else 5)
        except subprocess.TimeoutExpired:
            spawn.signal_group(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


class Executor:
    """The pull loop; run() returns the process exit status."""

    def __init__(self, config: ExecutorConfig):
        if config.slots < 1:
            raise ValueError(f"an executor needs at least one slot, not {config.slots}")
        self.target = addresses.parse(config.dispatcher)  # AddressError before any socket
        self.config = config
        self.id = config.executor_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, self.id.encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing while disconnected: we keep our own
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        if config.credentials is not None:
            config.credentials.apply(self.sock)
        self.link = link.LinkWatch(self.sock)  # read while unregistered, to say why
        addresses.connect(self.sock, self.target)
        self.cpus = config.cpus or host.cpus()
        self._setup_staging()
        self.slots = [Slot(i, self.staging_args) for i in range(config.slots)]
        self.queue: collections.deque[p.Assignment] = collections.deque()
        self.phase = Phase.ACTIVE
        self.exit_code = 0
        self.left_idle = False  #: it left because it had no work for idle_timeout_s
        self.registered = False
        self.session = ""  # the dispatcher_id of the dispatcher we registered with
        self.asked = 0
        self.started: list[tuple[int, int]] = []
        self.results: list[p.ExecResult] = []
        self.mean_s: float | None = None
        self.heartbeat_interval_s, self.heartbeat_timeout_s = 1.0, 10.0
        self.max_message_bytes = 256 << 20
        now = time.monotonic()
        self.heard = self.spoke = self.last_busy = now
        self.next_register, self.backoff_s = now, 0.1
        self.unregistered_since, self.next_complaint = now, now + FIRST_COMPLAINT_S
        self.drain_requested = self.stop_requested = False
        self._facts = {**host.facts(), **config.facts}
        self._facts["tags"] = sorted({*config.tags, *self._facts.get("tags", [])})
        if config.memory_mb:
            self._facts["memory"] = config.memory_mb << 20

    def _setup_staging(self) -> None:
        """The work root: task directories, the input cache (shared with the slots), an outbox."""
        root = self.config.work_dir or tempfile.mkdtemp(prefix="falconet-executor-")
        self.temp_root = "" if self.config.work_dir else root  #: removed when the executor ends
        self.work_root = os.path.join(root, "tasks")
        self.outbox = os.path.join(root, "outbox")
        for d in (self.work_root, self.outbox):
            os.makedirs(d, exist_ok=True)
        cache_bytes = self.config.cache_mb << 20
        self.cache = InputCache(os.path.join(root, "cache"), cache_bytes)
        self.staging_args = (self.work_root, self.cache.root, str(cache_bytes), self.outbox)
        self.staged: dict[int, tuple[p.Assignment, set[str]]] = {}  #: tid -> (task, blobs it waits for)
        self.fetching = staging.Downloads()  #: inputs on their way from the dispatcher
        self.prefetched: dict[int, list[str]] = {}  #: tid -> blobs fetched for it (cache misses)
        self.cache_counts = {"hits": 0, "misses": 0, "bytes_fetched": 0}
        self.cache_reported: dict = {}
    # ------------------------------------------------------------ lifecycle

    def request_drain(self, *_: Any) -> None:
        """SIGTERM: finish running tasks, hand back the rest, leave.  A second one stops now."""
        if self.drain_requested:
            self.stop_requested = True
        self.drain_requested = True

    def request_stop(self, *_: Any) -> None:
        """Stop now: kill running tasks and leave (whoever wanted their results is gone)."""
        self.drain_requested = self.stop_requested = True

    def run(self) -> int:
        """Serve until drained, idle past the timeout, refused or stopped."""
        for slot in self.slots:
            slot.start()
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        for slot in self.slots:
            self.poller.register(slot.rfd, zmq.POLLIN)
        log.info("executor %s: %d slots, dispatcher %s", self.id, len(self.slots), self.target.url)
        try:
            while self.phase is not Phase.DONE and not self.stop_requested:
                self._turn()
        finally:
            for slot in self.slots:
                slot.close(kill=self.stop_requested)
            self.link.close()
            self.sock.close()
            self.ctx.term()
            if self.temp_root:
                shutil.rmtree(self.temp_root, ignore_errors=True)
        return self.exit_code

    def _turn(self) -> None:
        ready = dict(self.poller.poll(self.config.poll_s * 1000))
        now = time.monotonic()
        if self.sock in ready:
            self._on_dispatcher(now)
        for slot in self.slots:
            if slot.rfd in ready:
                self._on_slot(slot, now)
        self._enforce_walltime(now)
        if self.drain_requested and self.phase is Phase.ACTIVE:
            self._begin_drain("asked to stop")
        self._feed_slots(now)
        self._housekeeping(now)
        self._flush(now)

    # ------------------------------------------------------------ dispatcher side

    def _on_dispatcher(self, now: float) -> None:
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.heard = now
            try:
                msg = p.decode(frame)
            except ProtocolError as exc:
                log.warning("dropped a malformed message from the dispatcher: %s", exc)
                continue
            self._handle(msg, now)

    def _handle(self, msg: Any, now: float) -> None:
        kind = type(msg)
        if kind is p.Tasks:
            self.asked = max(0, self.asked - len(msg.tasks))
            if self.phase is Phase.DRAINING:
                self._send(p.Drain([(a.tid, a.attempt) for a in msg.tasks]), now)
            else:
                for a in msg.tasks:
                    if a.files:
                        self._stage(a, now)
                    else:
                        self.queue.append(a)
        elif kind is p.BlobData:
            self._on_blob(msg, now)
        elif kind is p.Registered:
            if self.session and msg.dispatcher_id != self.session:
                self._abandon_work("the dispatcher restarted")
            self.session = msg.dispatcher_id
            if not self.registered:
                log.info("registered with the dispatcher at %s", self.target.url)
                self.link.update()  # drop the events of the attempts before
            self.registered, self.asked, self.backoff_s = True, 0, 0.1
            self._refetch(now, only_stalled=False)  # chunks in flight before were lost with the link
            self.heartbeat_interval_s = msg.heartbeat_interval_s
            self.heartbeat_timeout_s = msg.heartbeat_timeout_s
            self.max_message_bytes = msg.max_message_bytes
        elif kind is p.CancelTasks:
            self._cancel(set(msg.tids))
        elif kind is p.Reregister:
            log.info("dispatcher asks to register again: %s", msg.reason)
            self._abandon_work("the dispatcher no longer counts this executor's tasks as ours")
            self._unregistered(now)
        elif kind is p.Leave:
            if self.phase is Phase.ACTIVE:
                self._begin_drain(f"released by the dispatcher: {msg.reason}")
        elif kind is p.Refused:
            if msg.reason.startswith(p.WRONG_PORT):
                log.error("%s", p.refusal_text(msg.reason, self.target.url))
            else:
                log.error("the dispatcher refused this executor: %s", msg.reason)
            self.exit_code, self.phase = 1, Phase.DONE
        elif kind is not p.Heartbeat:
            log.warning("ignored %s: not a message for executors", kind.__name__)

    def _abandon_work(self, why: str) -> None:
        """Drop every task held: the dispatcher has requeued them, or forgotten them.

        Reregister means we were declared lost (our tasks run elsewhere now); a new
        dispatcher_id means a restart, and the new dispatcher may reuse task ids, so a late
        result of the old run could be taken for a new task's.  Queued tasks and unsent
        results are dropped and the slots still running such work are restarted.
        """
        busy = [s for s in self.slots if s.chunk]
        n = len(self.queue) + len(self.results) + sum(len(s.chunk) for s in busy) + len(self.staged)
        if not n:
            return
        log.warning("%s; abandoning the %d tasks held", why, n)
        self.queue.clear()
        self.staged.clear()
        self.prefetched.clear()
        self.fetching.abort_all()
        for r in self.results:  # outputs never to be sent
            if r.files and b"path" in r.files:
                try:
                    self._clear_outbox(staging.decode_result_files(r.files))
                except FalconetError:
                    pass
        self.results.clear()
        self.started.clear()
        for slot in busy:
            self._restart(slot, "abandoning a restarted dispatcher's work", kill=True)

    def _cancel(self, tids: set[int]) -> None:
        now = time.time()
        kept = collections.deque()
        for a in [*self.queue, *(a for a, _ in self.staged.values())]:
            if a.tid in tids:
                self.staged.pop(a.tid, None)
                self.prefetched.pop(a.tid, None)
                self.results.append(p.ExecResult(a.tid, a.attempt, _CANCELLED, b"", "cancelled before it started",
                                                 0.0, now, b""))
            elif a.tid not in self.staged:
                kept.append(a)
        self.queue = kept

    def _register(self, now: float) -> None:
        f = self._facts
        msg = p.Register(
            p.PROTOCOL_VERSION, self.id, f["hostname"], f["addresses"], self.cpus, f["memory"],
            f["platform"], len(self.slots), os.getpid(),
            {k: v for k, v in f.items() if k not in ("hostname", "addresses", "cpus", "memory", "platform")},
            self._holding(),
        )
        self._send(msg, now)
        self.next_register = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, 5.0)

    def _holding(self) -> list[tuple[int, int]]:
        held = [(a.tid, a.attempt) for a in self.queue]
        held += [(a.tid, a.attempt) for a, _ in self.staged.values()]
        for slot in self.slots:
            held += [(a.tid, a.attempt) for a in slot.chunk.values()]
        held += [(r.tid, r.attempt) for r in self.results]
        return held

    def _send(self, msg: Any, now: float) -> bool:
        try:
            self.sock.send(p.encode(msg), zmq.NOBLOCK)
        except zmq.Again:  # not connected (IMMEDIATE): the caller keeps what it had
            return False
        self.spoke = now
        return True

    def _flush(self, now: float) -> None:
        if not self.registered:
            return
        if not self._upload_outputs(now):
            return
        credit = self._credit_to_ask()
        stats = self._stats()
        while self.started or self.results or credit or stats:
            n = self._report_size()
            if not self._send(p.Report(credit, self.started, self.results[:n], stats), now):
                return
            self.asked += credit
            if stats:
                self.cache_reported = stats["cache"]
            self.started, self.results, credit, stats = [], self.results[n:], 0, {}

    def _stats(self) -> dict:
        """The input cache's counts, when they changed since the last report."""
        if self.cache_counts == self.cache_reported:
            return {}
        return {"cache": dict(self.cache_counts)}

    def _report_size(self) -> int:
        """How many results fit one Report under the dispatcher's message limit.

        A single result too large for any message is replaced by a failure saying so;
        sent as it is, it would get this executor disconnected again and again.
        """
        budget = p.record_budget(self.max_message_bytes)
        size = 0
        for i, r in enumerate(self.results[:MAX_REPORT]):
            n = len(r.output) + len(r.reason) + p.RECORD_OVERHEAD
            if n > budget:
                why = (f"the result of {len(r.output)} bytes is larger than the dispatcher "
                       f"accepts ({budget} bytes); return less, or write it to a file")
                self.results[i] = r._replace(state=_FAILED, output=b"", reason=why)
                n = len(why) + p.RECORD_OVERHEAD
            if size + n > budget and i:
                return i
            size += n
        return min(len(self.results), MAX_REPORT)

    def _credit_to_ask(self) -> int:
        if self.phase is not Phase.ACTIVE:
            return 0
        held = len(self.queue) + len(self.staged) + sum(len(s.chunk) for s in self.slots)
        target = self._target()
        deficit = target - held - self.asked
        if deficit <= 0:
            return 0
        if self.results or deficit * 4 >= target:  # piggyback, or worth a message of its own
            return deficit
        return 0

    def _target(self) -> int:
        n = len(self.slots)
        if self.config.prefetch is not None:
            return n + self.config.prefetch
        if self.mean_s is None:
            return 2 * n
        backlog = math.ceil(n / max(self.mean_s, 1e-6) * BACKLOG_WORK_S)
        return n + min(backlog, MAX_BACKLOG)

    def _housekeeping(self, now: float) -> None:
        if self.phase is Phase.DONE:
            return
        if self.registered and now - self.heard > self.heartbeat_timeout_s:
            log.warning("no word from the dispatcher for %.1fs; registering again", now - self.heard)
            self._unregistered(now)
        if not self.registered:
            self._complain(now)
        if not self.registered and now >= self.next_register:
            self._register(now)
        elif self.registered and now - self.spoke >= self.heartbeat_interval_s:
            self._send(p.Heartbeat(), now)
        if self.fetching and self.registered:
            self._refetch(now, only_stalled=True)
        busy = self.queue or self.results or self.staged or any(s.chunk for s in self.slots)
        if busy:
            self.last_busy = now
        elif self.phase is Phase.DRAINING:
            if self.registered:
                self._send(p.Bye(), now)
            self.phase = Phase.DONE
        elif self.config.idle_timeout_s and now - self.last_busy > self.config.idle_timeout_s:
            self.left_idle = True
            self._begin_drain(f"idle for {self.config.idle_timeout_s:g}s")

    def _unregistered(self, now: float) -> None:
        """Registration is lost: register again now, and complain if it takes long."""
        self.registered, self.next_register = False, now
        self.unregistered_since, self.next_complaint = now, now + FIRST_COMPLAINT_S

    def _complain(self, now: float) -> None:
        """While registration fails, say why in the log: once after a few seconds, then
        every COMPLAINT_EVERY_S (never more often)."""
        state = self.link.update()
        if now < self.next_complaint:
            return
        self.next_complaint = now + COMPLAINT_EVERY_S
        why = link.explain(state, "executor", self.config.credentials is not None)
        log.warning("still not registered with %s after %.0fs: %s", self.target.url,
                    now - self.unregistered_since, why)
        if self.link.stopped:  # libzmq gave up (a refused key): try again, as a key authorised
            self.sock.disconnect(self.target.url)  # meanwhile ('falconet keys add') gets in
            addresses.connect(self.sock, self.target)

    def _begin_drain(self, why: str) -> None:
        log.info("executor %s leaving (%s): finishing %d running tasks, handing back %d",
                 self.id, why, sum(len(s.chunk) for s in self.slots), len(self.queue))
        self.phase = Phase.DRAINING
        returned = [(a.tid, a.attempt) for a in self.queue]
        returned += [(a.tid, a.attempt) for a, _ in self.staged.values()]
        self.queue.clear()
        self.staged.clear()
        self.prefetched.clear()
        self._send(p.Drain(returned), time.monotonic())

    # ------------------------------------------------------------ slot side

    def _chunk_size(self) -> int:
        if self.mean_s is None:
            return 1
        n = min(MAX_CHUNK, max(1, int(CHUNK_WORK_S / max(self.mean_s, 1e-7))))
        return min(n, math.ceil(len(self.queue) / len(self.slots)))

    def _feed_slots(self, now: float) -> None:
        queue = self.queue
        # Short tasks: hand a slot its next chunk while it runs its last task, so it never
        # waits for this loop between tasks.  Long ones: a slot takes work only when free,
        # so work is not tied to a busy slot while another frees up.
        pipeline = self.mean_s is not None and self.mean_s < PIPELINE_BELOW_S
        used = sum(s.cpus for s in self.slots)
        for slot in self.slots:
            if not queue:
                return
            head = queue[0]
            alone = head.cpus > 1 or bool(head.files)  # multi-cpu and staged tasks go alone
            if slot.chunk and (alone or slot.cpus > 1 or not (pipeline and len(slot.chunk) == 1)):
                continue
            if not slot.chunk:
                # Packing by cpus, first come first served: a task waits for its cpus and
                # nothing behind it overtakes it, so a large task cannot starve here.
                room = self.cpus if head.cpus > 1 else max(self.cpus, len(self.slots))
                if used + head.cpus > room:
                    return
                used += head.cpus
            size = self._chunk_size()
            chunk = [queue.popleft()]
            if chunk[0].walltime_s == 0 and not alone:  # wall-time tasks go alone, so the clock is exact
                while len(chunk) < size and queue and queue[0].walltime_s == 0 and _plain(queue[0]):
                    chunk.append(queue.popleft())
            frame = [list(a) for a in chunk] if not alone else [[*chunk[0], self.prefetched.pop(chunk[0].tid, [])]]
            try:
                pipes.write_frame(slot.wfd, frame)
            except OSError:
                queue.extendleft(reversed(chunk))
                self._restart(slot, "its pipe broke")
                continue
            if not slot.chunk:
                slot.sent_at = now
            slot.chunk.update((a.tid, a) for a in chunk)
            self.started += [(a.tid, a.attempt) for a in chunk]

    def _on_slot(self, slot: Slot, now: float) -> None:
        while True:
            try:
                data = os.read(slot.rfd, 1 << 20)
            except BlockingIOError:
                return
            if not data:
                self._slot_died(slot)
                return
            for frame in slot.reader.feed(data):
                for r in frame:
                    slot.chunk.pop(r[0], None)
                    if len(r) == 9:  # a staged task's record ends with its input cache counts
                        for k, v in r.pop().items():
                            self.cache_counts[k] = self.cache_counts.get(k, 0) + v
                    result = p.ExecResult._make(r)
                    self.results.append(result)
                    took = max(result.finished - result.started, 0.0)
                    self.mean_s = took if self.mean_s is None else 0.9 * self.mean_s + 0.1 * took
                slot.sent_at = now  # the next task of the chunk started about now

    def _slot_died(self, slot: Slot) -> None:
        chunk = list(slot.chunk.values())
        code = self._restart(slot, "it died")
        if chunk:
            culprit, rest = chunk[0], chunk[1:]
            how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            self._fail(culprit, f"the slot process running this task died ({how})")
            self.queue.extendleft(reversed(rest))

    def _enforce_walltime(self, now: float) -> None:
        for slot in self.slots:
            if not slot.chunk:
                continue
            a = next(iter(slot.chunk.values()))
            if a.walltime_s <= 0:
                continue
            limit = a.walltime_s + (COMMAND_GRACE_S if a.kind == p.TaskKind.COMMAND else 0.0)
            if now - slot.sent_at > limit:
                rest = list(slot.chunk.values())[1:]
                slot.chunk = {}
                self._restart(slot, "a task ran past its wall time", kill=True)
                self._fail(a, f"wall time of {a.walltime_s:g}s exceeded; the slot running it was killed")
                self.queue.extendleft(reversed(rest))

    def _fail(self, a: p.Assignment, reason: str) -> None:
        now = time.time()
        self.results.append(p.ExecResult(a.tid, a.attempt, _FAILED, b"", reason, now, now, b""))

    def _restart(self, slot: Slot, why: str, kill: bool = False) -> int | None:
        self.poller.unregister(slot.rfd)
        slot.chunk = {}
        code = slot.close(kill=True)
        if not kill:
            log.warning("slot %d restarted: %s (status %s)", slot.index, why, code)
        slot.start()
        self.poller.register(slot.rfd, zmq.POLLIN)
        return code


    # ------------------------------------------------------------ staging

    def _stage(self, a: p.Assignment, now: float) -> None:
        """Queue a task with files once its dispatcher-held inputs are in the cache."""
        try:
            spec = staging.decode_spec(a.files)
        except FalconetError as exc:
            self._fail(a, f"the task's files could not be read: {exc}")
            return
        missing = {inp.blob for inp in spec.inputs if inp.blob and not self.cache.has(inp.blob)}
        if not missing:
            self.queue.append(a)
            return
        self.staged[a.tid] = (a, missing)
        # The slot counts these as cache misses: the blobs this task made cross the network.
        # A task that waits for a fetch another task started counts a hit.
        self.prefetched[a.tid] = sorted(d for d in missing if d not in self.fetching)
        for digest in missing:
            ask = self.fetching.begin(digest, lambda total, d=digest: self.cache.writer(d, total), now)
            if ask is not None:
                self._send(p.GetBlob(*ask), now)

    def _refetch(self, now: float, only_stalled: bool) -> None:
        """Ask again, from 0, for fetches that stalled (or all, after a reconnect)."""
        for ask in self.fetching.again(now, only_stalled):
            log.info("fetching input %s... again from the start", ask[0][:12])
            self._send(p.GetBlob(*ask), now)

    def _on_blob(self, msg: p.BlobData, now: float) -> None:
        """A chunk of an input from the dispatcher: into the cache, then release its tasks."""
        ended, ask, error = self.fetching.feed(msg.digest, msg.offset, msg.total, msg.data, msg.error, now)
        if ask is not None:
            self._send(p.GetBlob(*ask), now)
        if ended:
            why = f"input {msg.digest[:12]}... could not be fetched from the dispatcher: {error}" if error else ""
            self._release_staged(msg.digest, why)

    def _release_staged(self, digest: str, error: str) -> None:
        for tid, (a, missing) in list(self.staged.items()):
            if digest not in missing:
                continue
            if error:
                del self.staged[tid]
                self.prefetched.pop(tid, None)
                self._fail(a, error)
                continue
            missing.discard(digest)
            if not missing:
                del self.staged[tid]
                self.queue.append(a)

    def _upload_outputs(self, now: float) -> bool:
        """Send outputs meant for the client to the dispatcher's blob store, before their results.

        False when the dispatcher cannot be reached now: the results wait for the next turn.
        """
        for i, r in enumerate(self.results):
            if not r.files or b"path" not in r.files:
                continue
            files = staging.decode_result_files(r.files)
            if not any("path" in info for _, info in files):
                continue
            try:
                sent = self._send_outputs(files, now)
            except OSError as exc:  # the outbox was tampered with, or the disk failed
                self.results[i] = r._replace(state=_FAILED, files=b"",
                                             reason=f"an output could not be read back for sending: {exc}")
                self._clear_outbox(files)
                continue
            if not sent:
                return False
            self._clear_outbox(files)
            for _, info in files:
                info.pop("path", None)
            self.results[i] = r._replace(files=staging.encode_result_files(files))
        return True

    def _send_outputs(self, files: list, now: float) -> bool:
        for _, info in files:
            if "path" not in info:
                continue
            path = info["path"]
            digest = info.get("blob") or staging.file_sha256(path)
            for offset, data in staging.chunks(path):
                if not self._send(p.PutBlob(digest, offset, info["size"], data), now):
                    return False  # all of it again next turn: an upload restarts at offset 0
            info["blob"] = digest
        return True

    def _clear_outbox(self, files: list) -> None:
        """Remove the outbox folders of a result's outputs (one per task, under outbox/)."""
        for _, info in files:
            path = info.get("path")
            if path:
                rel = os.path.relpath(path, self.outbox).split(os.sep)[0]
                if rel not in ("", ".", ".."):
                    shutil.rmtree(os.path.join(self.outbox, rel), ignore_errors=True)


def _plain(a: p.Assignment) -> bool:
    """One cpu and no files: may share a chunk with others."""
    return a.cpus == 1 and not a.files
