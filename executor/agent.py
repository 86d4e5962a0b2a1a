"""The executor's I/O: connects out to the dispatcher, runs slot processes, and carries
out what its pull rules (:mod:`falconet.executor.pull`) decide.

One thread, one ZeroMQ DEALER socket and one pipe pair per slot, all in one poll loop.
The executor never listens on a port.  Each turn feeds what arrived (messages, slot
results, dead slots, downloaded inputs) to :class:`~falconet.executor.pull.Pull` and
applies the actions it returns; the input downloads, the outbox uploads and the link's
complaints are done here.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

from falconet import address as addresses
from falconet import link, spawn, staging
from falconet import protocol as p
from falconet.errors import FalconetError, ProtocolError
from falconet.executor import host, pipes
from falconet.executor.pull import (
    AbortFetches,
    Action,
    ClearOutbox,
    Complain,
    Inputs,
    Joined,
    Kill,
    Phase,
    Pull,
    Reclaim,
    Refetch,
    Run,
    Send,
    Upload,
)
from falconet.executor.workspace import InputCache

log = logging.getLogger("falconet.executor")

__all__ = ["Executor", "ExecutorConfig", "Phase", "Slot"]


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
    ends_at: float = 0.0  #: epoch time its allocation ends (a batch job's walltime); 0: never
    end_margin_s: float = 60.0  #: stop taking work this long before ends_at



class Slot:
    """One slot process and its pipes (the chunk it runs is kept by Pull)."""

    def __init__(self, index: int, staging_args: tuple[str, ...] = ()):
        self.index = index
        self.staging_args = staging_args  #: work root, cache dir, cache bytes, outbox
        self.proc: subprocess.Popen | None = None
        self.rfd = self.wfd = -1
        self.reader = pipes.FrameReader()

    def start(self) -> None:
        to_slot_r, to_slot_w = os.pipe()
        from_slot_r, from_slot_w = os.pipe()
        # Started with the reclaim signal blocked (the mask is inherited): until the slot has
        # its handler, the signal's default action would kill it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {pipes.RECLAIM_SIGNAL})
        try:
            self.proc = subprocess.Popen(
                spawn.module("falconet.executor.slot", str(to_slot_r), str(from_slot_w),
                             str(os.getpid()), *self.staging_args),
                pass_fds=(to_slot_r, from_slot_w), stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(to_slot_r)
        os.close(from_slot_w)
        os.set_blocking(from_slot_r, False)
        self.rfd, self.wfd = from_slot_r, to_slot_w
        self.reader = pipes.FrameReader()

    def signal(self, sig: int) -> None:
        """Send the slot process a signal; one that just died is replaced when its pipe ends."""
        if self.proc is not None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

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
        self.pull = Pull(config.slots, self.cpus, self._register_msg(), prefetch=config.prefetch,
                         idle_timeout_s=config.idle_timeout_s, dispatcher_url=self.target.url,
                         ends_at=config.ends_at, end_margin_s=config.end_margin_s)

    def _register_msg(self) -> p.Register:
        """This executor's Register message; Pull fills in what it holds when it sends it."""
        f = {**host.facts(), **self.config.facts}
        f["tags"] = sorted({*self.config.tags, *f.get("tags", [])})
        if self.config.memory_mb:
            f["memory_mb"] = self.config.memory_mb
        if self.config.ends_at:  # the dispatcher shows it, and gives no task that would outlast it
            f["ends_at"] = self.config.ends_at - self.config.end_margin_s
        return p.Register(
            p.PROTOCOL_VERSION, self.id, f["hostname"], f["addresses"], self.cpus, f["memory_mb"],
            f["platform"], self.config.slots, os.getpid(),
            {k: v for k, v in f.items() if k not in ("hostname", "addresses", "cpus", "memory_mb", "platform")},
            [],
        )

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
        self.fetching = staging.Downloads()  #: inputs on their way from the dispatcher

    @property
    def left_idle(self) -> bool:
        """It left because it had no work for idle_timeout_s."""
        return self.pull.left_idle

    # ------------------------------------------------------------ lifecycle

    def request_drain(self, *_: Any) -> None:
        """SIGTERM: finish running tasks, hand back the rest, leave.  A second one stops now."""
        self.pull.request_drain()

    def request_stop(self, *_: Any) -> None:
        """Stop now: kill running tasks and leave (whoever wanted their results is gone)."""
        self.pull.request_stop()

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
            while not self.pull.done:
                self._turn()
        finally:
            for slot in self.slots:
                slot.close(kill=self.pull.stop_requested)
            self.link.close()
            self.sock.close()
            self.ctx.term()
            if self.temp_root:
                shutil.rmtree(self.temp_root, ignore_errors=True)
        return self.pull.exit_code

    def _turn(self) -> None:
        wait_s = self.config.poll_s
        due = self.pull.report_due_in()
        if due is not None and due < wait_s:
            wait_s = due
        ready = dict(self.poller.poll(wait_s * 1000))
        if self.sock in ready:
            self._on_dispatcher()
        for slot in self.slots:
            if slot.rfd in ready:
                self._on_slot(slot)
        self._end_turn()

    def _end_turn(self) -> None:
        """Apply the turn's rules, then report; a report waits for its outputs' upload."""
        pull = self.pull
        if not pull.registered:
            self.link.update()  # read the link's events, to say why when complaining
        self._apply(pull.turn())
        if self.fetching and pull.registered:
            self._refetch(only_stalled=True)
        if self._apply(pull.flush()):
            self._apply(pull.flush())  # outputs uploaded: their results go now

    # ------------------------------------------------------------ events in

    def _on_dispatcher(self) -> None:
        pull = self.pull
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = p.decode(frame)
            except ProtocolError as exc:
                pull.heard_from_dispatcher()
                log.warning("dropped a malformed message from the dispatcher: %s", exc)
                continue
            if type(msg) is p.BlobData:
                pull.heard_from_dispatcher()
                self._on_blob(msg)
            elif type(msg) is p.Tasks and pull.phase is Phase.ACTIVE and any(a.files for a in msg.tasks):
                pull.on_message(msg, self._inputs(msg.tasks))
            else:
                pull.on_message(msg)

    def _on_slot(self, slot: Slot) -> None:
        while True:
            try:
                data = os.read(slot.rfd, 1 << 20)
            except BlockingIOError:
                return
            if not data:
                code = self._restart(slot, "it died")
                self.pull.on_slot_died(slot.index, code)
                return
            for kind, payload in slot.reader.feed(data):
                if kind == pipes.FromSlot.RESULTS:
                    self.pull.on_slot_results(slot.index, payload)
                else:
                    self.pull.on_handed_back(slot.index, *payload)

    # ------------------------------------------------------------ actions out

    def _apply(self, actions: list[Action]) -> bool:
        """Carry out the actions in order; True if an output upload finished."""
        uploaded = blocked = False  # blocked: a Report could not go, so the later ones wait too
        for action in actions:
            kind = type(action)
            if kind is Send:
                report = type(action.msg) is p.Report
                if (report and blocked) or not self._send(action.msg):
                    blocked = blocked or report
                    self.pull.unsent(action.msg)
            elif kind is Run:
                self._run(action)
            elif kind is Upload:
                if blocked or not self._upload(action):
                    blocked = True  # all of them again next turn, before any Report
                else:
                    uploaded = True
            else:
                self._apply_rare(action)
        return uploaded

    def _apply_rare(self, action: Action) -> None:
        kind = type(action)
        if kind is Reclaim:
            self.slots[action.slot].signal(pipes.RECLAIM_SIGNAL)
        elif kind is Kill:
            self._restart(self.slots[action.slot], action.why, kill=True)
        elif kind is ClearOutbox:
            try:
                self._clear_outbox(staging.decode_result_files(action.files))
            except FalconetError:
                pass
        elif kind is AbortFetches:
            self.fetching.abort_all()
        elif kind is Refetch:
            self._refetch(only_stalled=False)
        elif kind is Joined:
            log.info("registered with the dispatcher at %s", self.target.url)
            self.link.update()  # drop the events of the attempts before
        elif kind is Complain:
            self._complain(action.since_s)

    def _send(self, msg: Any) -> bool:
        try:
            self.sock.send(p.encode(msg), zmq.NOBLOCK)
        except zmq.Again:  # not connected (IMMEDIATE): the caller keeps what it had
            return False
        return True

    def _run(self, run: Run) -> None:
        slot = self.slots[run.slot]
        try:
            pipes.write_frame(slot.wfd, run.tasks)
        except OSError:
            code = self._restart(slot, "its pipe broke")
            self.pull.on_run_failed(run, code)

    def _restart(self, slot: Slot, why: str, kill: bool = False) -> int | None:
        self.poller.unregister(slot.rfd)
        code = slot.close(kill=True)
        if not kill:
            log.warning("slot %d restarted: %s (status %s)", slot.index, why, code)
        slot.start()
        self.poller.register(slot.rfd, zmq.POLLIN)
        return code

    def _complain(self, since_s: float) -> None:
        """Registration keeps failing: say why (Pull decides when: after a few seconds, then
        every so often)."""
        why = link.explain(self.link.state, "executor", self.config.credentials is not None)
        log.warning("still not registered with %s after %.0fs: %s", self.target.url, since_s, why)
        if self.link.stopped:  # libzmq gave up (a refused key): try again, as a key authorised
            self.sock.disconnect(self.target.url)  # meanwhile ('falconet keys add') gets in
            addresses.connect(self.sock, self.target)

    # ------------------------------------------------------------ staging

    def _inputs(self, tasks: list[p.Assignment]) -> dict[int, Inputs | str]:
        """What each task with files waits for; starts the downloads it needs."""
        found: dict[int, Inputs | str] = {}
        for a in tasks:
            if not a.files:
                continue
            try:
                spec = staging.decode_spec(a.files)
            except FalconetError as exc:
                found[a.tid] = f"the task's files could not be read: {exc}"
                continue
            missing = frozenset(inp.blob for inp in spec.inputs if inp.blob and not self.cache.has(inp.blob))
            # The slot counts these as cache misses: the blobs this task made cross the network.
            # A task that waits for a fetch another task started counts a hit.
            found[a.tid] = Inputs(missing, sorted(d for d in missing if d not in self.fetching))
            for digest in missing:
                ask = self.fetching.begin(digest, lambda total, d=digest: self.cache.writer(d, total),
                                          self.pull.clock())
                if ask is not None:
                    self._send_own(p.GetBlob(*ask))
        return found

    def _send_own(self, msg: Any) -> bool:
        """Send a message Pull does not know of (blob traffic); it counts as a sign of life."""
        if not self._send(msg):
            return False
        self.pull.note_spoke()
        return True

    def _refetch(self, only_stalled: bool) -> None:
        """Ask again, from 0, for fetches that stalled (or all, after a reconnect)."""
        for ask in self.fetching.again(self.pull.clock(), only_stalled):
            log.info("fetching input %s... again from the start", ask[0][:12])
            self._send_own(p.GetBlob(*ask))

    def _on_blob(self, msg: p.BlobData) -> None:
        """A chunk of an input from the dispatcher: into the cache, then release its tasks."""
        now = self.pull.clock()
        ended, ask, error = self.fetching.feed(msg.digest, msg.offset, msg.total, msg.data, msg.error, now)
        if ask is not None:
            self._send_own(p.GetBlob(*ask))
        if ended:
            why = f"input {msg.digest[:12]}... could not be fetched from the dispatcher: {error}" if error else ""
            self.pull.on_inputs(msg.digest, why)

    def _upload(self, up: Upload) -> bool:
        """Send a result's outbox files to the dispatcher's blob store, before the result.

        False when the dispatcher cannot be reached now: the results wait for the next turn.
        """
        files = staging.decode_result_files(up.files)
        try:
            for _, info in files:
                if "path" in info and not self._send_file(info):
                    return False  # all of it again next turn: an upload restarts at offset 0
        except OSError as exc:  # the outbox was tampered with, or the disk failed
            self.pull.upload_failed(up.tid, f"an output could not be read back for sending: {exc}")
            self._clear_outbox(files)
            return True
        self._clear_outbox(files)
        for _, info in files:
            info.pop("path", None)
        self.pull.uploaded(up.tid, staging.encode_result_files(files))
        return True

    def _send_file(self, info: dict) -> bool:
        digest = info.get("blob") or staging.file_sha256(info["path"])
        for offset, data in staging.chunks(info["path"]):
            if not self._send_own(p.PutBlob(digest, offset, info["size"], data)):
                return False
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
