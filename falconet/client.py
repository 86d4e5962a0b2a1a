"""The Python API: submit tasks to a dispatcher and get concurrent.futures back.

A client owns one background thread with one DEALER socket.  Submitting only appends to
an outbox and, if the thread is not already awake, wakes it with one byte on a pipe; the
thread sends everything waiting as one Submit message.  So a tight loop of submit() or a
map() over 100,000 items costs a handful of messages, not a round trip per task.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import zmq

from falconet import address as addresses
from falconet import keys, link, staging, tasks
from falconet import needs as nd
from falconet import protocol as p
from falconet.errors import (
    AddressError,
    DispatcherUnavailable,
    FalconetError,
    ProtocolError,
    RefusedError,
    TaskError,
)

log = logging.getLogger("falconet.client")

DEFAULT_RETRIES = 3
PING_S = 2.0  # ask the dispatcher for a sign of life after this much silence
HELLO_AGAIN_S = 10.0  # a Hello with no Welcome yet is sent again only after this long
_DONE, _FAILED, _CANCELLED = int(p.TaskState.DONE), int(p.TaskState.FAILED), int(p.TaskState.CANCELLED)


class TaskFuture(cf.Future):
    """A Future for one task; ``info`` holds the dispatcher's record once it finished."""

    def __init__(self, client: Client, seq: int, kind: int, label: str = ""):
        super().__init__()
        self.seq = seq
        self.kind = kind
        self.label = label  #: the command line, or the function's name
        self.info: p.TaskResult | None = None
        self.outputs: dict[str, str] = {}  #: staged output name -> where it was delivered
        self.blobs: tuple[str, ...] = ()  #: inputs uploaded to the dispatcher for this task
        self.dests: dict[str, str] = {}  #: output name -> the path on this machine it asked for
        self._client = client

    def cancel(self) -> bool:
        """Cancel locally and ask the dispatcher to drop the task if it has not started."""
        if self.cancel_here():
            self._client._cancel(self.seq)
            return True
        return False

    def cancel_here(self) -> bool:
        """Mark the future cancelled, telling no one (a task that was never sent)."""
        if super().cancel():
            self.set_running_or_notify_cancel()  # wakes wait() and as_completed()
            return True
        return False


class Client:
    """A connection to a dispatcher's client port."""

    def __init__(self, address: str | None = None, *, name: str = "",
                 connect_timeout_s: float = 10.0, retries: int = DEFAULT_RETRIES,
                 walltime_s: float = 0.0, dispatcher_timeout_s: float = 60.0,
                 dispatcher_key: str | None = None, key: str | None = None):
        """dispatcher_key and key: the dispatcher's public key and this client's secret key file,
        for a dispatcher started with --keys (default: $FALCONET_DISPATCHER_KEY, $FALCONET_KEY)."""
        address = address or os.environ.get("FALCONET_DISPATCHER")
        if not address:
            raise AddressError("no dispatcher address: pass one (tcp://HOST:PORT, the dispatcher's "
                               "client address) or set FALCONET_DISPATCHER")
        self._target = addresses.parse(address)  # AddressError before any thread
        self.address = self._target.url
        self._credentials = keys.credentials(dispatcher_key, key)  # KeyFileError before any thread
        self.id = uuid.uuid4().hex
        self.name = name or f"pid-{os.getpid()}"
        self.retries, self.walltime_s = retries, walltime_s
        self.dispatcher_timeout_s = dispatcher_timeout_s
        self.dispatcher_id = ""
        self._seq = itertools.count(1)
        self._batch = itertools.count(1)
        self._req = itertools.count(1)
        self._lock = threading.Lock()
        self._outbox: list[tuple[p.TaskSpec, TaskFuture]] = []
        self._control: list[Any] = []  # StatusRequest messages to send
        self._cancels: list[int] = []
        self._uploads: list[tuple[str, str]] = []  # (sha256, path) of inputs to send before the tasks
        self._blob_refs: dict[str, int] = {}  # uploaded input -> unfinished tasks that need it
        self._downloads = staging.Downloads()  # output blobs on their way here
        self._waiting: dict[str, list[tuple[int, str]]] = {}  # output blob -> [(seq, destination)]
        self._drops: list[str] = []  # blobs the dispatcher may forget (once per hold)
        self._spool_dir = ""  # copies of inputs waiting to be uploaded
        self._futures: dict[int, TaskFuture] = {}
        self._held: dict[int, list] = {}  # seq -> [result, outputs still to fetch, error]
        self._abandoned: set[int] = set()  # given up here before their result came
        self._unaccepted: dict[int, list[p.TaskSpec]] = {}  # batch -> specs, until Accepted
        self._hello_at = 0.0  # when we last said Hello with no Welcome since
        self._journal_id = ""  # the dispatcher's journal: a restart with another one lost our tasks
        self._status_waiters: dict[int, cf.Future] = {}
        self._status_asked: dict[int, p.StatusRequest] = {}  # to ask again after a restart
        self._wake_r, self._wake_w = os.pipe()
        self._awake = False
        self._closed = False
        self._welcome: cf.Future = cf.Future()
        self._link = link.Link.UNKNOWN  # what connecting came to, until the Welcome
        self.max_batch = 10_000
        self.max_message_bytes = 256 << 20
        self.max_output_bytes = 0  #: the dispatcher's --max-output-bytes (0: not announced)
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._io_loop, name="falconet-client", daemon=True)
        self._thread.start()
        try:
            welcome = self._welcome.result(timeout=connect_timeout_s)
        except cf.TimeoutError:
            self.close()
            why = link.explain(self._link, "client", self._credentials is not None)
            raise DispatcherUnavailable(
                f"no dispatcher answered at {self.address} within {connect_timeout_s:g}s; {why}") from None
        except Exception:
            self.close()
            raise
        self.max_batch = int(welcome.limits.get("max_submit_batch", self.max_batch))
        self.max_message_bytes = int(welcome.limits.get("max_message_bytes", self.max_message_bytes))
        self.max_output_bytes = int(welcome.limits.get("max_output_bytes", 0))

    # ------------------------------------------------------------ submitting

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run fn(*args, **kwargs) on an executor; the future holds its value or exception."""
        return self.submit_python(fn, args, kwargs)

    def submit_python(self, fn: Callable[..., Any], args: Sequence = (), kwargs: dict | None = None,
                      *, retries: int | None = None, walltime_s: float | None = None,
                      **placement: Any) -> TaskFuture:
        """submit() with per-task retries, wall-time limit (seconds, 0 = none), requirements
        (cpus, memory, arch, tags, where, prefer) and files (inputs, outputs)."""
        extra = self._placement(placement)
        body = tasks.encode_python(tasks.pickle_function(fn), tasks.pickle_arguments(tuple(args), kwargs or {}))
        return self._enqueue([(p.TaskKind.PYTHON, body, _name(fn))], retries, walltime_s, *extra)[0]

    def submit_command(self, cmd: str | Sequence[str], *, env: dict[str, str] | None = None,
                       cwd: str | None = None, stdin: bytes | str | None = None,
                       retries: int | None = None, walltime_s: float | None = None,
                       output_cap: int = tasks.DEFAULT_OUTPUT_CAP, stdout: str | None = None,
                       stderr: str | None = None, **placement: Any) -> TaskFuture:
        """Run a shell line (str) or argv (list); the future holds a CommandResult.

        output_cap: bytes of stdout and of stderr kept in the result; more is dropped and the
        result says truncated.  stdout, stderr: a file (a path here, relative to the current
        directory, or an s3:// URL) that receives that stream whole instead, even when the
        command fails; files through the dispatcher are limited to 256 MiB.
        placement: cpus, memory (MB), arch, tags, where ("any", "local", "cloud"), prefer
        ("local"), inputs and outputs (see the README's "Requirements and data staging").
        """
        self.check_output_cap(output_cap)
        extra = self._placement(placement, {"stdout": stdout, "stderr": stderr})
        body = tasks.encode_command(cmd, env=env, cwd=cwd, stdin=stdin, output_cap=output_cap)
        label = cmd if isinstance(cmd, str) else " ".join(cmd)
        return self._enqueue([(p.TaskKind.COMMAND, body, label)], retries, walltime_s, *extra)[0]

    def submit_commands(self, cmds: Iterable[str | Sequence[str]], **options: Any) -> list[TaskFuture]:
        """Submit many commands at once (one lock, one wake-up), all with the same options."""
        cap = options.pop("output_cap", tasks.DEFAULT_OUTPUT_CAP)
        self.check_output_cap(cap)
        retries, walltime_s = options.pop("retries", None), options.pop("walltime_s", None)
        extra = self._placement({k: options.pop(k) for k in list(options) if k in _PLACEMENT})
        items = [(p.TaskKind.COMMAND, tasks.encode_command(c, output_cap=cap, **options),
                  c if isinstance(c, str) else " ".join(c)) for c in cmds]
        return self._enqueue(items, retries, walltime_s, *extra)

    def map(self, fn: Callable[..., Any], *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, retries: int | None = None, walltime_s: float | None = None,
            **placement: Any) -> Iterator[Any]:
        """Like concurrent.futures.Executor.map: results in order; fn is pickled once.
        placement: requirements and files for every call, as for submit_python."""
        extra = self._placement(placement)
        fn_data = tasks.pickle_function(fn)
        name = _name(fn)
        futures: list[TaskFuture] = []
        batch: list[tuple[int, bytes, str]] = []
        for args in zip(*iterables):
            batch.append((p.TaskKind.PYTHON, tasks.encode_python(fn_data, tasks.pickle_arguments(args, {})), name))
            if len(batch) >= 4096:
                futures += self._enqueue(batch, retries, walltime_s, *extra)
                batch = []
        futures += self._enqueue(batch, retries, walltime_s, *extra)
        return _results_in_order(futures, timeout)

    def check_output_cap(self, output_cap: int) -> None:
        """Raise RefusedError for a raised output cap over the dispatcher's --max-output-bytes
        (a result of that size would fail); the default cap is never refused."""
        limit = self.max_output_bytes
        if output_cap > tasks.DEFAULT_OUTPUT_CAP and limit and output_cap > limit:
            raise RefusedError(
                f"an output cap of {tasks.format_bytes(output_cap)} is more than the dispatcher at "
                f"{self.address} accepts for a task's output ({limit} bytes, its --max-output-bytes); "
                "lower the cap, or send the output to files (stdout=/stderr=, falconet run --output-dir)")

    @staticmethod
    def _placement(options: dict, streams: dict | None = None) -> tuple[bytes, bytes, dict[str, str], dict[str, str]]:
        """(needs, files, {sha256: local path} to upload, {output name: where it goes here})
        from requirement and file keywords, and {stream: destination} of a command's streams."""
        unknown = set(options) - _PLACEMENT
        if unknown:
            raise TypeError(f"unexpected keyword arguments {', '.join(sorted(unknown))}; "
                            f"task options are {', '.join(sorted(_PLACEMENT))}")
        inputs, outputs = options.pop("inputs", ()) or (), options.pop("outputs", ()) or ()
        needs = nd.encode(nd.make(**options)) if options else b""
        streams = {k: v for k, v in (streams or {}).items() if v is not None}
        if not inputs and not outputs and not streams:
            return needs, b"", {}, {}
        spec, blobs = staging.spec_from_user(inputs, outputs, streams=streams)
        return needs, staging.encode_spec(spec), blobs, {o.name: o.client for o in spec.outputs if o.client}

    def _enqueue(self, items: list[tuple[int, bytes, str]], retries: int | None,
                 walltime_s: float | None, needs: bytes = b"", files: bytes = b"",
                 blobs: dict[str, str] | None = None, dests: dict[str, str] | None = None) -> list[TaskFuture]:
        if self._closed:
            raise RuntimeError("this client is closed")
        if not items:
            return []
        r = self.retries if retries is None else retries
        w = self.walltime_s if walltime_s is None else walltime_s
        made = []
        for kind, body, label in items:
            seq = next(self._seq)
            fut = TaskFuture(self, seq, int(kind), label)
            if blobs:
                fut.blobs = tuple(blobs)
            fut.dests = dests or {}
            made.append((p.TaskSpec(seq, int(kind), body, r, float(w), needs, files), fut))
        # New inputs are copied before the lock is taken (a copy can be slow); under it, a
        # digest no other task holds is queued for upload ahead of these tasks.
        copies = {d: self._spool(d, path) for d, path in (blobs or {}).items() if d not in self._blob_refs}
        try:
            with self._lock:
                for digest, path in (blobs or {}).items():
                    if self._blob_refs.get(digest, 0) == 0:
                        copy = copies.pop(digest, None) or self._spool(digest, path)  # released meanwhile
                        self._uploads.append((digest, copy))
                    self._blob_refs[digest] = self._blob_refs.get(digest, 0) + len(made)
                self._outbox += made
        finally:
            for copy in copies.values():  # another thread queued the same input first
                os.unlink(copy)
        self._wake()
        return [f for _, f in made]

    def _spool(self, digest: str, path: str) -> str:
        """A private copy of an input to upload, checked against its digest: the file may be
        rewritten between this submit and the I/O thread's upload."""
        if not self._spool_dir:
            self._spool_dir = tempfile.mkdtemp(prefix="falconet-client-")
        fd, copy = tempfile.mkstemp(dir=self._spool_dir, prefix=digest[:16] + ".")
        os.close(fd)
        shutil.copyfile(path, copy)
        if staging.file_sha256(copy) != digest:
            os.unlink(copy)
            staging.forget_hashes()
            raise staging.StagingError(f"input {path} changed while it was being submitted; submit again")
        return copy

    def _cancel(self, seq: int) -> None:
        with self._lock:
            self._cancels.append(seq)
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self._awake:
                return
            self._awake = True
        os.write(self._wake_w, b"x")

    # ------------------------------------------------------------ queries

    def status(self, detail: bool = False, timeout_s: float = 10.0) -> dict:
        """The dispatcher's statistics (detail adds the executor table)."""
        req = next(self._req)
        fut: cf.Future = cf.Future()
        with self._lock:
            self._status_waiters[req] = fut
            self._status_asked[req] = p.StatusRequest(req, detail)
            self._control.append(self._status_asked[req])
        self._wake()
        try:
            return fut.result(timeout=timeout_s)
        except cf.TimeoutError:
            raise DispatcherUnavailable(f"the dispatcher at {self.address} did not answer a status "
                                        f"request within {timeout_s:g}s") from None
        finally:
            with self._lock:
                self._status_waiters.pop(req, None)
                self._status_asked.pop(req, None)

    def release_executors(self, executor_ids: Iterable[str], reason: str) -> None:
        """Ask these executors to finish what they run and leave (the provisioner's scale-in)."""
        self._send_control(p.Release(list(executor_ids), reason))

    def report_fleet(self, info: dict) -> None:
        """Hand the dispatcher the provisioner's view of the fleet, for `falconet status`."""
        self._send_control(p.FleetReport(info))

    def _send_control(self, msg: Any) -> None:
        with self._lock:
            self._control.append(msg)
        self._wake()

    def executor(self) -> FuturesExecutor:
        """A concurrent.futures.Executor over this client."""
        return FuturesExecutor(self)

    # ------------------------------------------------------------ the I/O thread

    def _io_loop(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self._credentials is not None:
            self._credentials.apply(sock)
        watch: link.LinkWatch | None = None  # until the Welcome: why the dispatcher is silent
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._heard = self._pinged = time.monotonic()
        try:
            watch = link.LinkWatch(sock)
            poller.register(watch.socket, zmq.POLLIN)
            addresses.connect(sock, self._target)
            sock.send(p.encode(p.Hello(p.PROTOCOL_VERSION, self.id, self.name)))
            while not self._closed:
                ready = dict(poller.poll(500))
                if watch is not None and (watch.socket in ready or self._welcome.done()):
                    watch = self._watch_link(watch, poller)
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    self._send_waiting(sock)
                if sock in ready:
                    self._heard = time.monotonic()
                    self._receive(sock)
                self._check_liveness(sock, time.monotonic())
            self._send_waiting(sock)  # what was submitted or cancelled before close() goes out
        except Exception as exc:  # the thread's boundary: fail every waiter, do not hang them
            log.exception("the falconet client thread failed")
            if not self._welcome.done():
                self._welcome.set_exception(exc)
            self._fail_all(exc)
        finally:
            if watch is not None:
                watch.close()
            sock.close(linger=1000)  # let those last messages reach a live dispatcher

    def _watch_link(self, watch: link.LinkWatch, poller: zmq.Poller) -> link.LinkWatch | None:
        """Follow the connection until the Welcome; give up at once when waiting cannot help."""
        self._link = watch.update()
        if not self._welcome.done() and watch.hopeless:
            why = link.explain(self._link, "client", self._credentials is not None)
            self._welcome.set_exception(DispatcherUnavailable(f"cannot connect to {self.address}: {why}"))
        if not self._welcome.done():
            return watch
        poller.unregister(watch.socket)
        watch.close()
        return None

    def _send_waiting(self, sock: zmq.Socket) -> None:
        with self._lock:
            outbox, self._outbox = self._outbox, []
            control, self._control = self._control, []
            cancels, self._cancels = self._cancels, []
            uploads, self._uploads = self._uploads, []
            self._awake = False
        for digest, path in uploads:  # before the tasks that name them: the dispatcher keeps order
            self._upload(sock, digest, path)
        for part in self._batches(outbox):
            for spec, fut in part:
                self._futures[spec.seq] = fut
            batch = next(self._batch)
            self._unaccepted[batch] = specs = [s for s, _ in part]
            sock.send(p.encode(p.Submit(batch, specs)))
        if cancels:  # after the submits, so a cancel never overtakes its task
            control.append(p.Cancel(cancels))
        for msg in control:
            sock.send(p.encode(msg))

    def _batches(self, outbox: list[tuple[p.TaskSpec, TaskFuture]]) -> Iterator[list]:
        """Split the outbox under the dispatcher's count and size limits.

        A task too large for any message fails here with the reason, rather than getting
        this client disconnected by the dispatcher.
        """
        budget = p.record_budget(self.max_message_bytes)
        part: list = []
        size = 0
        for spec, fut in outbox:
            n = len(spec.body) + p.RECORD_OVERHEAD
            if n > budget:
                self._unref(fut)
                if fut.done():  # cancelled meanwhile
                    continue
                fut.set_exception(ValueError(
                    f"task of {len(spec.body)} bytes is larger than the dispatcher accepts "
                    f"({budget} bytes); pass large data through files or object storage"))
                continue
            if part and (len(part) >= self.max_batch or size + n > budget):
                yield part
                part, size = [], 0
            part.append((spec, fut))
            size += n
        if part:
            yield part

    def _upload(self, sock: zmq.Socket, digest: str, path: str) -> None:
        """Send one input file to the dispatcher's blob store, in chunks."""
        try:
            total = os.path.getsize(path)
            for offset, data in staging.chunks(path):
                sock.send(p.encode(p.PutBlob(digest, offset, total, data)))
        except OSError as exc:  # its tasks fail on the executor, naming the missing input
            log.error("could not upload input %s: %s", path, exc)
        finally:
            try:
                os.unlink(path)  # the spooled copy
            except OSError:
                pass

    def _receive(self, sock: zmq.Socket) -> None:
        acks: list[int] = []
        try:
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                try:
                    msg = p.decode(frame)
                except ProtocolError as exc:
                    log.warning("dropped a malformed message from the dispatcher: %s", exc)
                    continue
                self._handle(sock, msg, acks)
        finally:
            if acks:  # one Ack per burst; the dispatcher keeps each result until then
                sock.send(p.encode(p.Ack(acks)))
            with self._lock:
                drops, self._drops = self._drops, []
            if drops:
                sock.send(p.encode(p.DropBlobs(drops)))

    def _handle(self, sock: zmq.Socket, msg: Any, acks: list[int]) -> None:
        kind = type(msg)
        if kind is p.Results:
            for r in msg.results:
                self._result(sock, r)  # a duplicate (re-sent after a restart) resolves nothing
                acks.append(r.seq)
        elif kind is p.BlobData:
            self._on_blob(sock, msg)
        elif kind is p.Accepted:
            self._unaccepted.pop(msg.batch, None)
        elif kind is p.StatusReply:
            with self._lock:
                waiter = self._status_waiters.get(msg.req_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg.info)
        elif kind is p.Welcome:
            self._welcomed(sock, msg)
        elif kind is p.HelloAgain:  # a restarted dispatcher
            self._hello(sock, time.monotonic())
        elif kind is p.Refused:
            if not self._welcome.done():
                self._welcome.set_exception(RefusedError(p.refusal_text(msg.reason, self.address)))
            else:
                log.error("the dispatcher refused a request: %s", msg.reason)

    def _hello(self, sock: zmq.Socket, now: float) -> None:
        """Say Hello, once per answer: every Hello makes the dispatcher re-send our results."""
        if self._hello_at and now - self._hello_at < HELLO_AGAIN_S:
            return
        sock.send(p.encode(p.Hello(p.PROTOCOL_VERSION, self.id, self.name)))
        self._hello_at = now

    def _welcomed(self, sock: zmq.Socket, msg: p.Welcome) -> None:
        self._hello_at = 0.0
        self.max_batch = int(msg.limits.get("max_submit_batch", self.max_batch))
        self.max_message_bytes = int(msg.limits.get("max_message_bytes", self.max_message_bytes))
        self.max_output_bytes = int(msg.limits.get("max_output_bytes", 0))
        if not self._welcome.done():
            self.dispatcher_id, self._journal_id = msg.dispatcher_id, msg.limits.get("journal_id", "")
            self._welcome.set_result(msg)
            return
        if msg.dispatcher_id != self.dispatcher_id:
            self.dispatcher_id = msg.dispatcher_id
            with self._lock:  # answered HelloAgain by the new dispatcher: ask again
                asked = list(self._status_asked.values())
            for req in asked:
                sock.send(p.encode(req))
            journal_id = msg.limits.get("journal_id", "")
            if not journal_id or journal_id != self._journal_id:
                how = "without a journal" if not journal_id else "with another journal (--state-dir)"
                log.error("the dispatcher at %s restarted %s; tasks it had not finished are lost", self.address, how)
                self._journal_id = journal_id
                self._fail_all(DispatcherUnavailable(
                    f"the dispatcher at {self.address} restarted {how} and lost this task; submit it again"))
                self._abandoned.clear()  # their results will never come
                return
            log.warning("the dispatcher at %s restarted from its journal; sending %d unaccepted "
                        "tasks again", self.address, sum(map(len, self._unaccepted.values())))
            self._refetch(sock, time.monotonic(), only_stalled=False)  # its transfers died with it
        self._resubmit(sock)

    def _resubmit(self, sock: zmq.Socket) -> None:
        """Send again every batch not yet accepted, after any Welcome: a restart or a broken
        connection may have lost it.  Batches keep their numbers, so one the dispatcher
        already holds is not queued twice."""
        for batch, specs in sorted(self._unaccepted.items()):
            sock.send(p.encode(p.Submit(batch, specs)))

    def _check_liveness(self, sock: zmq.Socket, now: float) -> None:
        """Ping a silent dispatcher while tasks are out; fail them if it stays silent."""
        if not self._futures:
            self._heard = now
            return
        silent = now - self._heard
        if silent >= PING_S and now - self._pinged >= PING_S:
            # Hello, not a bare ping: the Welcome proves life, and the dispatcher sends again
            # any result it sent that we never acknowledged, such as one ZeroMQ dropped with
            # a broken connection (it reconnects without telling either side).
            self._hello(sock, now)
            self._pinged = now
        if self._downloads:
            self._refetch(sock, now, only_stalled=True)
        if silent > self.dispatcher_timeout_s:
            n = len(self._futures)
            self._fail_all(DispatcherUnavailable(
                f"no word from the dispatcher at {self.address} for {silent:.0f}s; "
                f"{n} unfinished tasks are given up (dispatcher_timeout_s={self.dispatcher_timeout_s:g})"))
            self._heard = now

    def _result(self, sock: zmq.Socket, r: p.TaskResult) -> None:
        """Resolve a task's future, once its outputs for this machine are fetched."""
        if r.seq in self._held:
            return  # sent again while its outputs are being fetched
        fut = self._futures.get(r.seq)
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
        self._held[r.seq] = [r, len(fetch), ""]
        now = time.monotonic()
        for digest, dest in sorted(fetch):
            ask = self._downloads.begin(
                digest, lambda total, d=digest, to=dest: staging.BlobWriter(to, d, total), now)
            if ask is not None:
                sock.send(p.encode(p.GetBlob(*ask)))
            self._waiting.setdefault(digest, []).append((r.seq, dest))

    def _on_blob(self, sock: zmq.Socket, msg: p.BlobData) -> None:
        """A chunk of an output: write it where the task asked; resolve its tasks when whole."""
        ended, ask, error = self._downloads.feed(msg.digest, msg.offset, msg.total, msg.data, msg.error,
                                                 time.monotonic())
        if ask is not None:
            sock.send(p.encode(p.GetBlob(*ask)))
        if not ended:
            return
        waiting = self._waiting.pop(msg.digest)
        if not error:
            try:
                first = waiting[0][1]
                for _, dest in waiting[1:]:  # the same content asked for in several places
                    if dest != first:
                        os.makedirs(os.path.dirname(dest), exist_ok=True)
                        shutil.copyfile(first, dest)
            except OSError as exc:
                error = str(exc)
        with self._lock:  # one release per result that held it
            self._drops += [msg.digest] * len({seq for seq, _ in waiting})
        for seq, dest in waiting:
            held = self._held.get(seq)
            if held is None:
                continue
            held[1] -= 1
            if error and not held[2]:
                held[2] = f"output for {dest} could not be fetched from the dispatcher: {error}"
            if held[1] <= 0:
                del self._held[seq]
                if held[2]:
                    self._give_up(seq, TaskError(held[2]))
                else:
                    self._resolve(held[0])

    def _refetch(self, sock: zmq.Socket, now: float, only_stalled: bool) -> None:
        """Ask again, from 0, for outputs whose fetch stalled (or all, after a Welcome)."""
        for ask in self._downloads.again(now, only_stalled):
            sock.send(p.encode(p.GetBlob(*ask)))

    def _drop_outputs(self, files: bytes) -> None:
        """Release the output blobs of a result no one will fetch."""
        try:
            digests = {info["blob"] for _, info in staging.decode_result_files(files) if "blob" in info}
        except FalconetError:
            return
        with self._lock:
            self._drops += sorted(digests)

    def _give_up(self, seq: int, exc: BaseException) -> None:
        """Fail one task's future and release what it held."""
        fut = self._futures.pop(seq, None)
        if fut is None:
            return
        self._unref(fut)
        try:
            fut.set_exception(exc)
        except cf.InvalidStateError:
            pass  # cancelled meanwhile

    def _resolve(self, r: p.TaskResult) -> None:
        fut = self._futures.pop(r.seq, None)
        if fut is None:
            if r.files and r.seq in self._abandoned:  # given up here; its outputs are released
                self._abandoned.discard(r.seq)
                self._drop_outputs(r.files)
            return  # a duplicate
        self._unref(fut)
        if fut.done():
            return  # cancelled here already
        fut.info = r
        try:
            self._settle(fut, r)
        except cf.InvalidStateError:
            pass  # cancelled by a user thread a moment ago

    def _settle(self, fut: TaskFuture, r: p.TaskResult) -> None:
        """Set a future from its result (raises InvalidStateError if it was just cancelled)."""
        if r.state == _CANCELLED:
            cf.Future.cancel(fut)
            fut.set_running_or_notify_cancel()
            return
        try:
            if fut.kind == p.TaskKind.COMMAND:
                if not r.output:
                    raise TaskError(r.reason, executor=r.executor, attempts=r.attempts)
                code, out, err, truncated = tasks.decode_command_output(r.output)
                fut.set_result(tasks.CommandResult(
                    code, out, err, truncated, r.executor, r.attempts,
                    {"submitted": r.submitted, "started": r.started, "finished": r.finished},
                    r.reason, fut.outputs))
            elif not r.output:
                raise TaskError(r.reason, executor=r.executor, attempts=r.attempts)
            else:
                fut.set_result(tasks.decode_python_output(r.output))
        except BaseException as exc:
            fut.set_exception(exc)

    def _unref(self, fut: TaskFuture) -> None:
        """A task that named these inputs is over: the dispatcher may drop unneeded ones."""
        if not fut.blobs:
            return
        digests, fut.blobs = fut.blobs, ()
        with self._lock:
            for d in digests:
                n = self._blob_refs.get(d, 0) - 1
                if n <= 0:
                    self._blob_refs.pop(d, None)
                    self._drops.append(d)
                else:
                    self._blob_refs[d] = n

    def _fail_all(self, exc: BaseException) -> None:
        for seq, fut in list(self._futures.items()):
            self._unref(fut)
            if seq not in self._held:
                self._abandoned.add(seq)  # a result still to come releases its outputs
            try:
                fut.set_exception(exc)
            except cf.InvalidStateError:
                pass  # done or cancelled already
        self._futures.clear()
        self._unaccepted.clear()
        self._held.clear()
        with self._lock:
            for digest in self._downloads.abort_all():
                self._drops += [digest] * len({seq for seq, _ in self._waiting.pop(digest)})

    # ------------------------------------------------------------ closing

    def close(self, cancel: bool = False) -> None:
        """Stop the I/O thread; with cancel, ask the dispatcher to drop the unfinished tasks.

        Without cancel, tasks already submitted keep running at the dispatcher.
        """
        if cancel and not self._closed:
            with self._lock:
                self._cancels += [seq for seq, f in list(self._futures.items()) if not f.done()]
                dropped, self._outbox = self._outbox, []
            for _, fut in dropped:  # never sent: cancelled here, and their inputs released
                self._unref(fut)
                fut.cancel_here()
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            os.write(self._wake_w, b"x")
            self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._ctx.term()
        self._fail_all(RuntimeError("the falconet client was closed before this task finished"))
        closed = RuntimeError("the falconet client was closed before this task was sent")
        for _, fut in self._outbox:  # submitted while closing: never sent
            self._unref(fut)
            try:
                fut.set_exception(closed)
            except cf.InvalidStateError:
                pass
        self._outbox = []
        if self._spool_dir:
            shutil.rmtree(self._spool_dir, ignore_errors=True)

    def pending(self) -> int:
        """Tasks submitted through this client that have no result yet."""
        return len(self._futures) + len(self._outbox)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FuturesExecutor(cf.Executor):
    """A concurrent.futures.Executor whose calls run on a falconet Client's executors.

    Not an executor process (that is `falconet executor`): the name says which kind it is.
    """

    def __init__(self, client: Client):
        self._client = client
        self._futures: weakref.WeakSet[TaskFuture] = weakref.WeakSet()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut = self._client.submit(fn, *args, **kwargs)
        self._futures.add(fut)
        return fut

    def map(self, fn: Callable[..., Any], *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._client.map(fn, *iterables, timeout=timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        futures = list(self._futures)
        if cancel_futures:
            for f in futures:
                f.cancel()
        if wait:
            cf.wait(futures)


def _results_in_order(futures: list[TaskFuture], timeout: float | None) -> Iterator[Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for fut in futures:
            yield fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
    finally:
        for fut in futures:
            fut.cancel()


_PLACEMENT = frozenset({"cpus", "memory", "arch", "tags", "where", "prefer", "inputs", "outputs"})


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


#: The old name of FuturesExecutor, kept for one release (it read like the executor process).
FalconetExecutor = FuturesExecutor
