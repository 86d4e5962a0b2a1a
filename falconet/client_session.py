"""The client's side of the protocol, with no sockets (sans-IO).

:class:`falconet.client.Client` owns the DEALER socket and the I/O thread.  It feeds a
:class:`ClientSession` the dispatcher's decoded messages with the monotonic time
(:meth:`~ClientSession.handle`), calls :meth:`~ClientSession.flush` when woken and
:meth:`~ClientSession.tick` after each poll, and sends what
:meth:`~ClientSession.take_output` returns: input files first, then the messages.  Tests
drive the same object directly.

The session keeps what is outstanding: tasks sent and not finished (``futures``), batches
sent and not yet ``Accepted`` (sent again, with their numbers, after any Welcome), results
to acknowledge, and status requests to ask again of a restarted dispatcher.  Results
resolve their futures once; copies the dispatcher sends again resolve nothing.

Threads: user threads queue work (:meth:`add`, :meth:`cancel`, :meth:`control`,
:meth:`ask_status`) under ``lock``, and learn whether the I/O thread must be woken; every
other method runs on the I/O thread (or after it ended).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import operator
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from falconet import protocol as p
from falconet import staging
from falconet.client_files import InputRefs, OutputFetches
from falconet.errors import DispatcherUnavailable, FalconetError, RefusedError, TaskError
from falconet.futures import TaskFuture, settle

log = logging.getLogger("falconet.client")

PING_S = 2.0  # ask the dispatcher for a sign of life after this much silence
HELLO_AGAIN_S = 10.0  # a Hello with no Welcome yet is sent again only after this long

Queued = tuple[p.TaskSpec, TaskFuture]  #: a task waiting in the outbox, and its future


_SPEC, _FUTURE = operator.itemgetter(0), operator.itemgetter(1)  # of a Queued (spec, future)
_SEQ, _BODY = operator.itemgetter(0), operator.itemgetter(2)  # of a TaskSpec


class Output(NamedTuple):
    """What to send, in this order: input files (the tasks naming them follow), then messages."""

    uploads: list[tuple[str, str]]  #: (sha256, spooled copy): stream as PutBlob, then delete
    messages: list[Any]


class ClientSession:
    """What this client has outstanding at the dispatcher, and the rules that keep it whole."""

    def __init__(self, client_id: str, name: str, address: str, dispatcher_timeout_s: float = 60.0):
        """address names the dispatcher in error messages; dispatcher_timeout_s is the silence
        after which the tasks out are given up."""
        self.client_id, self.name, self.address = client_id, name, address
        self.dispatcher_timeout_s = dispatcher_timeout_s
        self.dispatcher_id = ""
        self.max_batch = 10_000  #: tasks per Submit; the Welcome's limits replace these
        self.max_message_bytes = 256 << 20
        self.max_output_bytes = 0  #: the dispatcher's --max-output-bytes (0: not announced)
        self.welcome: cf.Future = cf.Future()  #: the first Welcome, or why there will be none
        self.lock = threading.Lock()
        # Shared with user threads, under lock:
        self._outbox: list[Queued] = []
        self._flushing: list[Queued] = []  # taken from the outbox, not yet in futures
        self._control: list[Any] = []  # StatusRequest, Release, FleetReport messages to send
        self._cancels: list[int] = []
        self._uploads: list[tuple[str, str]] = []  # (sha256, path) of inputs to send before the tasks
        self._inputs = InputRefs()  # uploaded, with the unfinished tasks that name them
        self._drops: list[str] = []  # blobs the dispatcher may forget (once per hold)
        self._awake = False  # the I/O thread was woken and has not flushed since
        self._status_waiters: dict[int, cf.Future] = {}
        self._status_asked: dict[int, p.StatusRequest] = {}  # to ask again after a restart
        self._req = itertools.count(1)
        # The I/O thread's own:
        self.futures: dict[int, TaskFuture] = {}  #: sent, no result yet
        self.unaccepted: dict[int, list[p.TaskSpec]] = {}  #: batch -> specs, until Accepted
        self.fetches = OutputFetches()  #: results held until their outputs are here
        self._abandoned: set[int] = set()  # given up here before their result came
        self._batch = itertools.count(1)
        self._journal_id = ""  # the dispatcher's journal: a restart with another one lost our tasks
        self._hello_at = 0.0  # when we last said Hello with no Welcome since
        self._heard = self._pinged = 0.0
        self._out: list[Any] = []
        self._upload_queue: list[tuple[str, str]] = []
        self._acks: list[int] = []

    # ------------------------------------------------------------ from user threads

    def add(self, queued: list[Queued], blobs: dict[str, str] | None = None,
            copies: dict[str, str] | None = None, spool: Callable[[str, str], str] | None = None) -> bool:
        """Queue tasks to send; True when the I/O thread must be woken.

        blobs: {sha256: local path} of inputs the tasks name.  One no unfinished task holds is
        uploaded ahead of them, from its private copy: copies[sha256] (made before, without
        the lock; popped when used), else spool(sha256, path) makes one now.
        """
        with self.lock:
            if blobs:
                self._hold_inputs(blobs, len(queued), copies or {}, spool)
            self._outbox += queued
            if self._awake:  # _wake_needed() inlined: this runs once per submit
                return False
            self._awake = True
            return True

    def add1(self, spec: p.TaskSpec, fut: TaskFuture) -> bool:
        """add() for one task that names no input (submit's fast path)."""
        with self.lock:
            self._outbox.append((spec, fut))
            if self._awake:
                return False
            self._awake = True
            return True

    def holds_input(self, digest: str) -> bool:
        """True if an unfinished task already uploaded this input (a hint, read without the lock)."""
        return digest in self._inputs

    def cancel(self, seq: int) -> bool:
        """Ask the dispatcher to drop a task; True when the I/O thread must be woken."""
        with self.lock:
            self._cancels.append(seq)
            return self._wake_needed()

    def control(self, msg: Any) -> bool:
        """Queue a control message (Release, FleetReport); True when the I/O thread must be woken."""
        with self.lock:
            self._control.append(msg)
            return self._wake_needed()

    def ask_status(self, detail: bool) -> tuple[int, cf.Future, bool]:
        """Queue a StatusRequest: (its id, the future of its answer, must the thread be woken)."""
        return self.ask(lambda req: p.StatusRequest(req, detail))

    def ask(self, make: Callable[[int], Any]) -> tuple[int, cf.Future, bool]:
        """Queue a request answered by a StatusReply (StatusRequest, EventsRequest): make builds
        it from its id.  Returns (its id, the future of its answer, must the thread be woken)."""
        req = next(self._req)
        fut: cf.Future = cf.Future()
        msg = make(req)
        with self.lock:
            self._status_waiters[req] = fut
            self._status_asked[req] = msg
            self._control.append(msg)
            return req, fut, self._wake_needed()

    def forget_status(self, req: int) -> None:
        """The asker stopped waiting: do not ask again after a restart."""
        with self.lock:
            self._status_waiters.pop(req, None)
            self._status_asked.pop(req, None)

    def outstanding(self) -> list[TaskFuture]:
        """The futures of every task submitted and not finished (some may be done by now)."""
        with self.lock:
            queued = [f for _, f in self._outbox] + [f for _, f in self._flushing]
        return [f for f in queued + list(self.futures.values()) if not f.done()]

    def cancel_unstarted(self) -> None:
        """Cancel every task that has not started (here, and at the dispatcher)."""
        with self.lock:
            dropped, self._outbox = self._outbox, []
        for _, fut in dropped:  # never sent: cancelled here, and their inputs released
            self._unref(fut)
            fut.cancel_here()
        for fut in self.outstanding():
            fut.cancel()  # False for a running one: it finishes

    def pending(self) -> int:
        """Tasks submitted that have no result yet."""
        return len(self.futures) + len(self._outbox)

    def _wake_needed(self) -> bool:
        """Under lock: the first call since the last flush says the thread must be woken."""
        if self._awake:
            return False
        self._awake = True
        return True

    def _hold_inputs(self, blobs: dict[str, str], tasks: int, copies: dict[str, str],
                     spool: Callable[[str, str], str] | None) -> None:
        """Under lock: count the tasks holding each input; queue a new one for upload."""
        for digest, path in blobs.items():
            if digest not in self._inputs:
                copy = copies.pop(digest, None)
                if copy is None:  # released since the caller looked
                    if spool is None:
                        raise ValueError(f"input {path} needs a copy to upload: pass copies or spool")
                    copy = spool(digest, path)
                self._uploads.append((digest, copy))
            self._inputs.hold(digest, tasks)

    # ------------------------------------------------------------ the I/O thread's

    def start(self, now: float) -> None:
        """The socket is connecting: say Hello."""
        self._heard = self._pinged = now
        self._out.append(p.Hello(p.PROTOCOL_VERSION, self.client_id, self.name))

    def flush(self) -> None:
        """Take what user threads queued: uploads, then Submits, then cancels and control."""
        with self.lock:
            outbox, self._outbox = self._outbox, []
            control, self._control = self._control, []
            cancels, self._cancels = self._cancels, []
            uploads, self._uploads = self._uploads, []
            self._awake = False
            self._flushing = outbox  # outstanding() sees them until they are in futures
        self._upload_queue += uploads
        out, futures = self._out, self.futures
        for part in self._batches(outbox):
            specs = list(map(_SPEC, part))  # per task in C: a burst of submit() is thousands
            futures.update(zip(map(_SEQ, specs), map(_FUTURE, part)))
            batch = next(self._batch)
            self.unaccepted[batch] = specs
            out.append(p.Submit(batch, specs))
        self._flushing = []
        if cancels:  # after the submits, so a cancel never overtakes its task
            out.append(p.Cancel(cancels))
        out += control

    def take_output(self) -> Output:
        """Return and clear what to send: uploads, messages, one Ack, the blobs to drop."""
        uploads, self._upload_queue = self._upload_queue, []
        out, self._out = self._out, []
        if self._acks:  # one Ack per burst; the dispatcher keeps each result until then
            out.append(p.Ack(self._acks))
            self._acks = []
        if self._drops:
            with self.lock:
                drops, self._drops = self._drops, []
            out.append(p.DropBlobs(drops))
        return Output(uploads, out)

    def heard(self, now: float) -> None:
        """The dispatcher sent something: it is alive."""
        self._heard = now

    def handle(self, msg: Any, now: float) -> None:
        """One decoded message from the dispatcher."""
        kind = type(msg)
        if kind is p.Results:
            held, resolve = self.fetches.held, self._resolve
            for r in msg.results:  # a duplicate (re-sent after a restart) resolves nothing
                if r.files or r.seq in held:
                    self._result_with_files(r, now)
                else:
                    resolve(r)
            self._acks += [r.seq for r in msg.results]
        elif kind is p.Started:
            TaskFuture.mark_all_running(filter(None, map(self.futures.get, msg.seqs)))
        elif kind is p.BlobData:
            self._on_blob(msg, now)
        elif kind is p.Accepted:
            self.unaccepted.pop(msg.batch, None)
        elif kind is p.StatusReply:
            with self.lock:
                waiter = self._status_waiters.get(msg.req_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg.info)
        elif kind is p.Welcome:
            self._welcomed(msg, now)
        elif kind is p.HelloAgain:  # a restarted dispatcher
            self._hello(now)
        elif kind is p.Refused:
            if not self.welcome.done():
                self.welcome.set_exception(RefusedError(p.refusal_text(msg.reason, self.address)))
            else:
                log.error("the dispatcher refused a request: %s", msg.reason)

    def tick(self, now: float) -> None:
        """Ping a silent dispatcher while tasks are out; fail them if it stays silent."""
        if not self.futures:
            self._heard = now
            return
        silent = now - self._heard
        if silent >= PING_S and now - self._pinged >= PING_S:
            # Hello, not a bare ping: the Welcome proves life, and the dispatcher sends again
            # any result it sent that we never acknowledged, such as one ZeroMQ dropped with
            # a broken connection (it reconnects without telling either side).
            self._hello(now)
            self._pinged = now
        if self.fetches:
            self._out += self.fetches.again(now, only_stalled=True)
        if silent > self.dispatcher_timeout_s:
            n = len(self.futures)
            self.fail_all(DispatcherUnavailable(
                f"no word from the dispatcher at {self.address} for {silent:.0f}s; "
                f"{n} unfinished tasks are given up (dispatcher_timeout_s={self.dispatcher_timeout_s:g})"))
            self._heard = now

    def fail_all(self, exc: BaseException) -> None:
        """Fail every task sent and not finished, and abort the fetches of their outputs."""
        for seq, fut in list(self.futures.items()):
            if seq not in self.fetches:
                self._abandoned.add(seq)  # a result still to come releases its outputs
            self._fail(fut, exc)
        self.futures.clear()
        self.unaccepted.clear()
        drops = self.fetches.abort_all()
        with self.lock:
            self._drops += drops

    def fail_unsent(self, exc: BaseException) -> None:
        """Fail the tasks still in the outbox (submitted while closing: never sent)."""
        for _, fut in self._outbox:
            self._fail(fut, exc)
        self._outbox = []

    # ------------------------------------------------------------ sending

    def _batches(self, outbox: list[Queued]) -> Iterator[list[Queued]]:
        """Split the outbox under the dispatcher's count and size limits.

        A task too large for any message fails here with the reason, rather than getting
        this client disconnected by the dispatcher.
        """
        budget = p.record_budget(self.max_message_bytes)
        max_batch, overhead = self.max_batch, p.RECORD_OVERHEAD
        sizes = list(map(len, map(_BODY, map(_SPEC, outbox))))
        if sizes and len(sizes) <= max_batch and sum(sizes) + overhead * len(sizes) <= budget:
            yield outbox  # the usual burst: one message, every task within the budget
            return
        part: list[Queued] = []
        size = 0
        for spec, fut in outbox:
            n = len(spec.body) + overhead
            if n > budget:
                self._fail(fut, ValueError(
                    f"task of {len(spec.body)} bytes is larger than the dispatcher accepts "
                    f"({budget} bytes); pass large data through files or object storage"))
                continue
            if part and (len(part) >= max_batch or size + n > budget):
                yield part
                part, size = [], 0
            part.append((spec, fut))
            size += n
        if part:
            yield part

    def _hello(self, now: float) -> None:
        """Say Hello, once per answer: every Hello makes the dispatcher re-send our results."""
        if self._hello_at and now - self._hello_at < HELLO_AGAIN_S:
            return
        self._out.append(p.Hello(p.PROTOCOL_VERSION, self.client_id, self.name))
        self._hello_at = now

    def _welcomed(self, msg: p.Welcome, now: float) -> None:
        self._hello_at = 0.0
        self.max_batch = int(msg.limits.get("max_submit_batch", self.max_batch))
        self.max_message_bytes = int(msg.limits.get("max_message_bytes", self.max_message_bytes))
        self.max_output_bytes = int(msg.limits.get("max_output_bytes", 0))
        if not self.welcome.done():
            self.dispatcher_id, self._journal_id = msg.dispatcher_id, msg.limits.get("journal_id", "")
            self.welcome.set_result(msg)
            return
        if msg.dispatcher_id != self.dispatcher_id and not self._restarted(msg, now):
            return
        self._resubmit()

    def _restarted(self, msg: p.Welcome, now: float) -> bool:
        """A new dispatcher answered: ask our status requests again, then either fetch
        outputs again (it restarted from its journal: True) or give up every task out."""
        self.dispatcher_id = msg.dispatcher_id
        with self.lock:  # answered HelloAgain by the new dispatcher: ask again
            self._out += self._status_asked.values()
        journal_id = msg.limits.get("journal_id", "")
        if not journal_id or journal_id != self._journal_id:
            how = "without a journal" if not journal_id else "with another journal (--state-dir)"
            log.error("the dispatcher at %s restarted %s; tasks it had not finished are lost", self.address, how)
            self._journal_id = journal_id
            self.fail_all(DispatcherUnavailable(
                f"the dispatcher at {self.address} restarted {how} and lost this task; submit it again"))
            self._abandoned.clear()  # their results will never come
            return False
        log.warning("the dispatcher at %s restarted from its journal; sending %d unaccepted "
                    "tasks again", self.address, sum(map(len, self.unaccepted.values())))
        self._out += self.fetches.again(now, only_stalled=False)  # its transfers died with it
        return True

    def _resubmit(self) -> None:
        """Send again every batch not yet accepted, after any Welcome: a restart or a broken
        connection may have lost it.  Batches keep their numbers, so one the dispatcher
        already holds is not queued twice."""
        for batch, specs in sorted(self.unaccepted.items()):
            self._out.append(p.Submit(batch, specs))

    # ------------------------------------------------------------ results

    def _result_with_files(self, r: p.TaskResult, now: float) -> None:
        """Resolve a task's future, once its outputs for this machine are fetched."""
        if r.seq in self.fetches:
            return  # sent again while its outputs are being fetched
        fut = self.futures.get(r.seq)
        if fut is None or fut.done() or not r.files:
            if fut is not None and r.files:  # cancelled here: no one fetches its outputs
                self._drop_outputs(r.files)
            self._resolve(r)
            return
        try:
            files = staging.decode_result_files(r.files)
        except FalconetError as exc:
            self._give_up(r.seq, TaskError(f"the task's output files could not be read: {exc}"))
            return
        fut.outputs = {name: info.get("s3") or fut.dests.get(name, "") for name, info in files}
        stray = [name for name, info in files if "blob" in info and name not in fut.dests]
        if stray:  # the destination is ours to choose, never the executor's
            self._drop_outputs(r.files)
            self._give_up(r.seq, TaskError(f"the executor returned output {stray[0]!r}, which this task "
                                           "did not ask for; nothing was written"))
            return
        fetch = {(info["blob"], fut.dests[name]) for name, info in files if "blob" in info}
        if not fetch:
            self._resolve(r)
            return
        self._out += self.fetches.hold(r, fetch, now)

    def _on_blob(self, msg: p.BlobData, now: float) -> None:
        """A chunk of an output: write it where the task asked; resolve its tasks when whole."""
        asks, drops, released = self.fetches.feed(msg, now)
        self._out += asks
        if drops:
            with self.lock:
                self._drops += drops
        for r, error in released:
            if error:
                self._give_up(r.seq, TaskError(error))
            else:
                self._resolve(r)

    def _drop_outputs(self, files: bytes) -> None:
        """Release the output blobs of a result no one will fetch."""
        try:
            digests = {info["blob"] for _, info in staging.decode_result_files(files) if "blob" in info}
        except FalconetError:
            return
        with self.lock:
            self._drops += sorted(digests)

    def _give_up(self, seq: int, exc: BaseException) -> None:
        """Fail one task's future and release what it held."""
        fut = self.futures.pop(seq, None)
        if fut is not None:
            self._fail(fut, exc)

    def _fail(self, fut: TaskFuture, exc: BaseException) -> None:
        """Release what a task held and fail its future, unless it is done (cancelled) already."""
        self._unref(fut)
        try:
            fut.set_exception(exc)
        except cf.InvalidStateError:
            pass  # done, or cancelled by a user thread a moment ago

    def _resolve(self, r: p.TaskResult) -> None:
        fut = self.futures.pop(r.seq, None)
        if fut is None:
            if r.files and r.seq in self._abandoned:  # given up here; its outputs are released
                self._abandoned.discard(r.seq)
                self._drop_outputs(r.files)
            return  # a duplicate
        if fut.blobs:
            self._unref(fut)
        if fut.done():
            return  # cancelled here already
        fut.info = r
        try:
            settle(fut, r)
        except cf.InvalidStateError:
            pass  # cancelled by a user thread a moment ago

    def _unref(self, fut: TaskFuture) -> None:
        """A task that named these inputs is over: the dispatcher may drop unneeded ones."""
        if not fut.blobs:
            return
        digests, fut.blobs = fut.blobs, ()
        with self.lock:
            self._drops += self._inputs.release(digests)
