"""The Python API: submit tasks to a dispatcher and get concurrent.futures back.

A client owns one background thread with one DEALER socket.  Submitting only appends to
an outbox and, if the thread is not already awake, wakes it with one byte on a pipe; the
thread sends everything waiting as one Submit message.  So a tight loop of submit() or a
map() over 100,000 items costs a handful of messages, not a round trip per task.

This module is the API and the I/O: the protocol's state and rules (what is outstanding,
acks, results into futures, what to do after a restart) are the sans-IO
:class:`~falconet.client_session.ClientSession`; the futures and the concurrent.futures
executor are in :mod:`falconet.futures`.
"""

from __future__ import annotations

import atexit
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
from falconet.client_session import HELLO_AGAIN_S, PING_S, ClientSession, Output
from falconet.errors import AddressError, DispatcherUnavailable, ProtocolError, RefusedError
from falconet.futures import FalconetExecutor, FuturesExecutor, TaskFuture, results_in_order

__all__ = ["DEFAULT_RETRIES", "HELLO_AGAIN_S", "PING_S", "Client", "FalconetExecutor", "FuturesExecutor",
           "TaskFuture"]

log = logging.getLogger("falconet.client")

DEFAULT_RETRIES = 3
SLOTS_MAX_AGE_S = 1.0  #: how long Client.slots() trusts its last count


def _session_attribute(name: str, doc: str) -> property:
    """A Client attribute that lives in its session (the I/O thread updates it)."""
    return property(lambda self: getattr(self._session, name),
                    lambda self, value: setattr(self._session, name, value), doc=doc)


class Client:
    """A connection to a dispatcher's client port."""

    dispatcher_id = _session_attribute("dispatcher_id", "The dispatcher's id, from its Welcome.")
    dispatcher_timeout_s = _session_attribute(
        "dispatcher_timeout_s", "Silence after which the unfinished tasks are given up.")
    max_batch = _session_attribute("max_batch", "Tasks per Submit (the dispatcher's max_submit_batch).")
    max_message_bytes = _session_attribute("max_message_bytes", "The largest message the dispatcher reads.")
    max_output_bytes = _session_attribute(
        "max_output_bytes", "The dispatcher's --max-output-bytes (0: not announced).")

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
        #: the dispatcher's dashboard, for a client of falconet.local(dashboard=True) ("" otherwise)
        self.dashboard_url = ""
        self._credentials = keys.credentials(dispatcher_key, key)  # KeyFileError before any thread
        self.id = uuid.uuid4().hex
        self.name = name or f"pid-{os.getpid()}"
        self.retries, self.walltime_s = retries, walltime_s
        self._session = ClientSession(self.id, self.name, self.address, dispatcher_timeout_s)
        self._seq = itertools.count(1)
        self._spool_dir = ""  # copies of inputs waiting to be uploaded
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._slots = (1, -SLOTS_MAX_AGE_S)  # (count, when read) for slots()
        self._slots_lock = threading.Lock()
        self._link = link.Link.UNKNOWN  # what connecting came to, until the Welcome
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._io_loop, name="falconet-client", daemon=True)
        self._thread.start()
        self._wait_for_welcome(connect_timeout_s)
        _OPEN.add(self)

    def _wait_for_welcome(self, timeout_s: float) -> None:
        """Return once the dispatcher welcomed this client; else close and raise why not."""
        try:
            self._session.welcome.result(timeout=timeout_s)
        except cf.TimeoutError:
            self.close()
            why = link.explain(self._link, "client", self._credentials is not None)
            raise DispatcherUnavailable(
                f"no dispatcher answered at {self.address} within {timeout_s:g}s; {why}") from None
        except Exception:
            self.close()
            raise

    # ------------------------------------------------------------ submitting

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run fn(*args, **kwargs) on an executor; the future holds its value or exception."""
        # submit_python without options, and _enqueue for one task: this is the call a
        # plain loop makes per task, and every microsecond here is one of the caller's.
        if self._closed:
            raise RuntimeError("this client is closed")
        body = tasks.encode_python(tasks.pickle_function(fn), tasks.pickle_arguments(args, kwargs))
        seq = next(self._seq)
        fut = TaskFuture(self, seq, _PYTHON, _name(fn))
        if self._session.add1(p.TaskSpec(seq, _PYTHON, body, self.retries, float(self.walltime_s), b"", b""), fut):
            os.write(self._wake_w, b"x")
        return fut

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
        """Like concurrent.futures.Executor.map: every call is submitted now, results come in
        order, the timeout counts from this call; fn is pickled once.
        placement: requirements and files for every call, as for submit_python."""
        deadline_from = time.monotonic()
        futures = self.map_futures(fn, *iterables, retries=retries, walltime_s=walltime_s, **placement)
        left = None if timeout is None else timeout - (time.monotonic() - deadline_from)
        return results_in_order(futures, left)

    def map_futures(self, fn: Callable[..., Any], *iterables: Iterable, retries: int | None = None,
                    walltime_s: float | None = None, **placement: Any) -> list[TaskFuture]:
        """Submit fn over the iterables (as map does) and return the futures, in order."""
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
        return futures

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
            if dests:
                fut.dests = dests
            made.append((p.TaskSpec(seq, int(kind), body, r, float(w), needs, files), fut))
        if self._add_with_inputs(made, blobs) if blobs else self._session.add(made):
            os.write(self._wake_w, b"x")
        return [f for _, f in made]

    def _add_with_inputs(self, made: list[tuple[p.TaskSpec, TaskFuture]], blobs: dict[str, str]) -> bool:
        """Queue tasks that name inputs; True when the I/O thread must be woken."""
        # New inputs are copied before the lock is taken (a copy can be slow); under it, a
        # digest no other task holds is queued for upload ahead of these tasks.
        copies = {d: self._spool(d, path) for d, path in blobs.items() if not self._session.holds_input(d)}
        try:
            return self._session.add(made, blobs, copies, self._spool)
        finally:
            for copy in copies.values():  # another thread queued the same input first
                os.unlink(copy)

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
        if self._session.cancel(seq):
            os.write(self._wake_w, b"x")

    # ------------------------------------------------------------ queries

    def status(self, detail: bool = False, timeout_s: float = 10.0) -> dict:
        """The dispatcher's statistics (detail adds the executor table)."""
        return self._ask(lambda req: p.StatusRequest(req, detail), "a status request", timeout_s)

    def events(self, after: int = 0, since: float = 0.0, limit: int = 1000, timeout_s: float = 10.0) -> dict:
        """The dispatcher's events numbered above after and at or after wall time since (at most
        limit, oldest first): {"events": [maps], "next": N, "first": N, "dropped": N, "more": bool}.
        Ask again with after=next for the following ones (docs/observing.md)."""
        info = self._ask(lambda req: p.EventsRequest(req, after, since, limit), "an events request", timeout_s)
        if "error" in info:
            raise RefusedError(info["error"])
        return info

    def _ask(self, make: Any, what: str, timeout_s: float) -> dict:
        req, fut, wake = self._session.ask(make)
        if wake:
            os.write(self._wake_w, b"x")
        try:
            return fut.result(timeout=timeout_s)
        except cf.TimeoutError:
            raise DispatcherUnavailable(f"the dispatcher at {self.address} did not answer {what} "
                                        f"within {timeout_s:g}s") from None
        finally:
            self._session.forget_status(req)

    def release_executors(self, executor_ids: Iterable[str], reason: str) -> None:
        """Ask these executors to finish what they run and leave (the provisioner's scale-in)."""
        self._send_control(p.Release(list(executor_ids), reason))

    def report_fleet(self, info: dict) -> None:
        """Hand the dispatcher the provisioner's view of the fleet, for `falconet status`."""
        self._send_control(p.FleetReport(info))

    def _send_control(self, msg: Any) -> None:
        if self._session.control(msg):
            os.write(self._wake_w, b"x")

    def executor(self) -> FuturesExecutor:
        """A concurrent.futures.Executor over this client (its shutdown leaves the client open)."""
        return FuturesExecutor(self)

    def slots(self, max_age_s: float = SLOTS_MAX_AGE_S) -> int:
        """Slots of the executors connected to the dispatcher now (at least 1): how many tasks
        run at once.  Read from status, and cached for max_age_s."""
        now = time.monotonic()
        with self._slots_lock:
            count, at = self._slots
            if now - at < max_age_s:
                return count
            try:
                found = int(self.status()["slots"])
            except DispatcherUnavailable:
                return count  # the last count (1 before any) until the dispatcher answers
            if found < 1:
                return 1  # no executor yet: ask again next time
            self._slots = (found, time.monotonic())
            return found

    # ------------------------------------------------------------ the I/O thread

    def _io_loop(self) -> None:
        sock = self._socket()
        session = self._session
        watch: link.LinkWatch | None = None  # until the Welcome: why the dispatcher is silent
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            watch = link.LinkWatch(sock)
            poller.register(watch.socket, zmq.POLLIN)
            addresses.connect(sock, self._target)
            session.start(time.monotonic())
            self._send(sock, session.take_output())
            while not self._closed:
                ready = dict(poller.poll(500))
                if watch is not None and (watch.socket in ready or session.welcome.done()):
                    watch = self._watch_link(watch, poller)
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    session.flush()
                    self._send(sock, session.take_output())
                if sock in ready:
                    session.heard(time.monotonic())
                    self._receive(sock)
                session.tick(time.monotonic())
                self._send(sock, session.take_output())
            session.flush()  # what was submitted or cancelled before close() goes out
            self._send(sock, session.take_output())
        except Exception as exc:  # the thread's boundary: fail every waiter, do not hang them
            log.exception("the falconet client thread failed")
            if not session.welcome.done():
                session.welcome.set_exception(exc)
            session.fail_all(exc)
        finally:
            if watch is not None:
                watch.close()
            sock.close(linger=1000)  # let those last messages reach a live dispatcher

    def _socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self._credentials is not None:
            self._credentials.apply(sock)
        return sock

    def _watch_link(self, watch: link.LinkWatch, poller: zmq.Poller) -> link.LinkWatch | None:
        """Follow the connection until the Welcome; give up at once when waiting cannot help."""
        self._link = watch.update()
        welcome = self._session.welcome
        if not welcome.done() and watch.hopeless:
            why = link.explain(self._link, "client", self._credentials is not None)
            welcome.set_exception(DispatcherUnavailable(f"cannot connect to {self.address}: {why}"))
        if not welcome.done():
            return watch
        poller.unregister(watch.socket)
        watch.close()
        return None

    def _receive(self, sock: zmq.Socket) -> None:
        """Hand the session every message waiting, then send what it has to say."""
        handle, clock = self._session.handle, time.monotonic
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
                handle(msg, clock())
        finally:
            self._send(sock, self._session.take_output())

    def _send(self, sock: zmq.Socket, output: Output) -> None:
        for digest, path in output.uploads:  # before the tasks that name them: the dispatcher keeps order
            self._upload(sock, digest, path)
        for msg in output.messages:
            sock.send(p.encode(msg))

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

    # ------------------------------------------------------------ closing

    def close(self, cancel: bool = False, wait: bool = True) -> None:
        """Wait for the tasks submitted to finish, then stop the I/O thread.

        As concurrent.futures' ``shutdown(wait=True)``: a ``with Client(...)`` or
        ``falconet.local()`` block, and a script that ends with a client open, wait for
        the work they submitted.  cancel first cancels every task not yet started (those
        running finish).  wait=False returns at once: the futures still unfinished fail
        here, and their tasks (cancelled or not) are no longer this client's concern.
        Ctrl-C while waiting cancels what has not started and closes without waiting.  A
        dispatcher that stays silent fails the tasks out after dispatcher_timeout_s, which
        ends the wait.
        """
        if self._closed:
            return
        if cancel:
            self._session.cancel_unstarted()
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            try:
                self._wait_outstanding()
            except BaseException:
                self._session.cancel_unstarted()
                self.close(wait=False)
                raise
        self._close_now()

    def _wait_outstanding(self) -> None:
        """Wait until every task submitted so far has finished (or was cancelled)."""
        while True:
            futures = self._session.outstanding()
            if not futures:
                return
            cf.wait(futures)

    def _close_now(self) -> None:
        self._closed = True
        _OPEN.discard(self)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            os.write(self._wake_w, b"x")
            self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._ctx.term()
        self._session.fail_all(RuntimeError("the falconet client was closed before this task finished"))
        self._session.fail_unsent(RuntimeError("the falconet client was closed before this task was sent"))
        if self._spool_dir:
            shutil.rmtree(self._spool_dir, ignore_errors=True)

    def pending(self) -> int:
        """Tasks submitted through this client that have no result yet."""
        return self._session.pending()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """Wait for the work submitted; after an error, cancel what has not started instead."""
        if exc_type is None:
            self.close()
        else:
            self.close(cancel=True, wait=False)


#: Clients not yet closed: a script that ends with one open waits for its work, as
#: concurrent.futures does for its executors.
_OPEN: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    for client in list(_OPEN):
        client.close()


_PLACEMENT = frozenset({"cpus", "memory", "arch", "tags", "where", "prefer", "inputs", "outputs"})


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


_PYTHON = int(p.TaskKind.PYTHON)
