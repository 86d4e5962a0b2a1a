"""The dispatcher's ZeroMQ event loop: one thread, two ROUTER sockets, batched I/O.

Each turn drains every waiting message from both ports, lets the core react, dispatches
queued work against executor credit, and applies the core's output (:func:`apply_output`):
journal first, then the messages.  Nothing here knows the rules;
:mod:`falconet.dispatcher.core` does.
"""

from __future__ import annotations

import errno
import functools
import gc
import ipaddress
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zmq

from falconet import keys, staging
from falconet import protocol as p
from falconet.dispatcher.blobs import BlobStore, Holds, Streams
from falconet.dispatcher.core import Config, Core, TurnOutput
from falconet.dispatcher.journal import Journal
from falconet.dispatcher.observe import TURN_BUCKETS, Histogram, Observer, Snapshot
from falconet.dispatcher.status import status_report
from falconet.dispatcher.web import WebOptions, WebServer
from falconet.errors import BindRefused, FalconetError, JournalWriteError, ProtocolError

log = logging.getLogger("falconet.dispatcher")

_RECV_PER_TURN = 20_000
#: a turn reads one port for at most this long; what is left waits for the next turn, so a
#: burst of large Submits neither holds back the other port nor makes a turn look like a stall
READ_S = 0.2
BLOB_BYTES_PER_TURN = 8 << 20  # blob chunks sent per loop turn, so file transfers never stall tasks
MAX_TRANSFERS_PER_PEER = 16  # blobs sent to one peer at once; streams beyond wait their turn
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)  # a plain int: pyzmq's enum arithmetic shows up in profiles
JOURNAL_RETRY_S = 0.5  #: how often a journal that could not be written is tried again
#: the loop woke this much later than it asked to: it stalled (executors' silence is then
#: measured from its return)
STALL_S = 1.0
LISTEN_BACKLOG = 4096  # 10,000 executors connecting at once overflow libzmq's default of 100  # bound a turn so one busy port cannot starve the other


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _RateLimitedLog:
    """At most one warning a second for bad input, with a count of what it held back."""

    def __init__(self) -> None:
        self.last = 0.0
        self.held = 0

    def warn(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < 1.0:
            self.held += 1
            return
        if self.held:
            fmt += " (and %d more bad messages in the last second)"
            args = (*args, self.held)
        log.warning(fmt, *args)
        self.last, self.held = now, 0


def apply_output(out: TurnOutput, commit: Callable[[list], bool | None] | None,
                 to_client: Callable[[bytes, Any], bool],
                 to_executor: Callable[[bytes, Any], bool],
                 held: list[tuple[bytes, Any]] | None = None) -> list[tuple[bytes, Any]]:
    """Apply one turn's output: commit its journal records (written and synced) before any
    message to a client goes out, then send.  commit is None without a journal; when it
    returns False (the journal cannot be written now) the Accepted messages wait in held,
    in order, and go out after the next commit that succeeds: Accepted is the promise that
    a batch is on disk.  The rest goes out at once: a result sent before its record is on
    disk, or a task handed out before its client heard Accepted, can at worst run twice
    after a crash (at-least-once), and a status reply must show the stall.
    Returns the messages no executor could be reached for; an unroutable client's results
    stay unacknowledged and go out again after its next Hello."""
    durable = commit is None or commit(out.journal) is not False
    # Executors first: their tasks are on the way to running while the clients hear.
    unreachable = [(peer, msg) for peer, msg in out.to_executors if not to_executor(peer, msg)]
    if durable and held:
        for peer, msg in held:
            to_client(peer, msg)
        held.clear()
    for peer, msg in out.to_clients:
        if durable or type(msg) is not p.Accepted:
            to_client(peer, msg)
        else:
            held.append((peer, msg))
    return unreachable


class Server:
    """Binds the client and executor ports and runs the event loop."""

    def __init__(self, host: str = "127.0.0.1", client_port: int = 0, executor_port: int = 0,
                 config: Config = Config(), *, insecure: bool = False, state_dir: str | None = None,
                 compact_bytes: int = 64 << 20, keys_dir: str | None = None,
                 blob_store_bytes: int = 4 << 30, event_history: int = 100_000,
                 http: WebOptions | None = None):
        """event_history: task and fleet events kept (0: none); http: serve metrics, the
        dashboard and the JSON status from a thread of this process (see web.py)."""
        if not is_loopback(host) and not insecure and not keys_dir:
            raise BindRefused(
                f"refusing to listen on {host} without authentication: make keys with 'falconet keys "
                "init DIR' and pass --keys DIR, bind 127.0.0.1, or pass --insecure if the network is trusted")
        if insecure and not keys_dir and not is_loopback(host):
            log.warning("INSECURE: listening on %s without authentication; anyone who can "
                        "reach these ports can submit and run commands", host)
        self.insecure = insecure and not keys_dir and not is_loopback(host)
        # Read before anything binds: a bad key file must stop the start, not half of it.
        self.server_pair = keys.load_secret(f"{keys_dir}/{keys.DISPATCHER}{keys.SECRET_SUFFIX}") if keys_dir else None
        self.journal = Journal(state_dir) if state_dir else None
        reporters: dict[str, Callable[[], Any]] = {"security": self._security}
        if self.journal is not None:
            reporters["journal"] = self._journal_status
        reporters["blobs"] = lambda: {**self.blobs.status(), **self.blob_counts}
        self.core = Core(config, journal_id=self.journal.id if self.journal is not None else None,
                         reporters=reporters)
        self.compact_bytes = compact_bytes
        self.journal_error = ""  #: why the journal cannot be written now ("" when it can)
        self._stalled_at = self._retry_at = 0.0
        self._held: list[tuple[bytes, Any]] = []  #: clients' messages waiting for the journal
        if self.journal is not None:
            self._restore()
        # Staged files: kept with the journal when there is one, else in a temp dir of this run.
        self._blob_tmp = None if state_dir else tempfile.mkdtemp(prefix="falconet-blobs-")
        self.blobs = BlobStore(os.path.join(state_dir, "blobs") if state_dir else self._blob_tmp,
                               max_bytes=blob_store_bytes, durable=bool(state_dir))
        self.holds = Holds(self.blobs)
        self.streams = Streams(self.blobs, staging.FETCH_WINDOW, staging.CHUNK_BYTES, MAX_TRANSFERS_PER_PEER)
        self.blob_counts = {"stored": 0, "fetches": 0, "bytes_sent": 0}  #: files in, fetches served, bytes out
        # The queue holds millions of small tracked objects; CPython's default of a young
        # collection every 700 allocations makes the collector a large share of each turn.
        gc.set_threshold(100_000, 50, 1000)
        self.ctx = zmq.Context()
        self.zap: keys.ZapHandler | None = None
        if keys_dir:  # the handler must be bound before the CURVE sockets
            self.zap = keys.ZapHandler(self.ctx, {r: keys.authorized_dir(keys_dir, r) for r in keys.ROLES})
        self.client_sock = self._router(host, client_port, config.max_message_bytes, "client")
        self.executor_sock = self._router(host, executor_port, config.max_message_bytes, "executor")
        self.client_address = self.client_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.executor_address = self.executor_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.zap is not None:  # handshakes failing before ZAP show only in the sockets' monitors
            self.zap.watch({"client": self.client_sock, "executor": self.executor_sock})
        self.core.endpoints = {"client": self.client_address, "executor": self.executor_address}
        self._to_client = functools.partial(self._send, self.client_sock)  # (peer, msg) -> sent?
        self._to_executor = functools.partial(self._send, self.executor_sock)
        self._stop = False
        self._bad = _RateLimitedLog()
        self._owners: dict[str, dict[bytes, str]] = {}  #: per port: routing id -> CURVE key
        self.messages = {("client", "in"): 0, ("client", "out"): 0, ("executor", "in"): 0, ("executor", "out"): 0}
        self.turns = Histogram(TURN_BUCKETS)
        self.observer: Observer | None = None
        self.web: WebServer | None = None
        self.http_address = ""
        if event_history > 0 or http is not None:
            folder = os.path.join(state_dir, "events") if state_dir and event_history > 0 else None
            self.observer = Observer(event_history, folder, timings=http is not None)
            if event_history > 0:
                self.core.events = []
                self.core.event_source = self.observer.events
        if http is not None:
            try:
                self.web = WebServer(self.observer, http)
            except BaseException:
                self.close()
                raise
            self.http_address = self.web.url

    def _router(self, host: str, port: int, max_bytes: int, role: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        if self.server_pair is not None:
            keys.server_socket(sock, self.server_pair, role)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise: we learn a peer left
        if self.server_pair is None:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer takes over its identity
        else:
            # With keys, no connection may take over another's routing id; ZMTP heartbeats
            # retire a dead connection, so its peer's reconnection is let in soon after.
            sock.setsockopt(zmq.HEARTBEAT_IVL, max(100, int(self.core.config.heartbeat_interval_s * 1000)))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(300, int(self.core.config.heartbeat_timeout_s * 1000)))
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)  # ZeroMQ drops a peer that sends more
        sock.setsockopt(zmq.SNDHWM, 0)  # credit bounds executor traffic; results must not drop
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
            sock.setsockopt(zmq.IPV6, 1)
        sock.bind(f"tcp://{host}:{port or '*'}")
        return sock

    def _restore(self) -> None:
        """Replay the state directory's journal into the core (which journals from its start)."""
        t0 = time.monotonic()
        journal, core = self.journal, self.core
        queued = core.restore(journal.replay())
        results = sum(len(c.unacked) for c in core.clients.values())
        log.info("journal %s: %d tasks queued again and %d results kept for %d clients, in %.2fs",
                 journal.path, queued, results, len(core.clients), time.monotonic() - t0)
        if journal.size >= self.compact_bytes:
            self._compact()
        self._compact_at = max(self.compact_bytes, 2 * journal.size)

    def _commit(self, records: list[tuple[int, tuple]]) -> bool:
        """Journal this turn's records (one write, one fdatasync), compacting when it has grown.
        False when they could not be written: they stay buffered and are tried again, at
        most every JOURNAL_RETRY_S, while new submissions are refused (see _reject)."""
        journal = self.journal
        for kind, fields in records:
            journal.append(kind, *fields)
        if not journal.pending():
            return not self.journal_error
        if self.journal_error and time.monotonic() < self._retry_at:
            return False
        try:
            journal.commit()
        except JournalWriteError as exc:
            self._retry_at = time.monotonic() + JOURNAL_RETRY_S
            if not self.journal_error:
                self.journal_error, self._stalled_at = str(exc), time.time()
                log.error("%s; accepted tasks and results are kept in memory and written again every "
                          "%gs; new tasks are refused until it can be written", exc, JOURNAL_RETRY_S)
            return False
        if self.journal_error:
            log.warning("the journal %s is written again (%d held messages go out); new tasks are "
                        "accepted again", journal.path, len(self._held))
            self.journal_error = ""
        if journal.size >= self._compact_at:
            self._compact()
            # At least double again before the next compaction: the cost stays linear.
            self._compact_at = max(self.compact_bytes, 2 * journal.size)
        return True

    def _compact(self) -> None:
        t0 = time.monotonic()
        journal, before = self.journal, self.journal.size
        if not journal.room_to_compact():
            log.warning("journal %s not compacted: the disk has less free space than its %d bytes; "
                        "it is tried again when the journal has grown further", journal.path, before)
            return
        try:
            journal.rewrite(self.core.snapshot())
        except JournalWriteError as exc:
            log.warning("%s; the journal stays as it was", exc)
            return
        log.info("journal compacted from %d to %d bytes in %.2fs", before, journal.size, time.monotonic() - t0)

    def _journal_status(self) -> dict:
        j = self.journal
        info = {"state_dir": str(j.dir), "journal_bytes": j.size, "commits": j.commits,
                "recovered": j.recovered_from, "writable": not self.journal_error}
        if self.journal_error:
            info.update(error=self.journal_error, since_s=time.time() - self._stalled_at,
                        pending_bytes=j.pending_bytes(), held_messages=len(self._held))
        return info

    def _reject(self, peer: bytes, msg: p.Submit) -> None:
        """Answer a new batch while the journal cannot be written: Accepted, with every task
        failed at once for the reason (nothing of it is queued or journaled)."""
        wall = time.time()
        reason = (f"the dispatcher refuses new tasks: {self.journal_error}. Accepted tasks are safe; "
                  "free space there (or fix the disk) and submit again")
        failed = [p.TaskResult(s.seq, int(p.TaskState.FAILED), b"", reason, "", 0, wall, 0.0, wall) for s in msg.tasks]
        self._send(self.client_sock, peer, p.Accepted(msg.batch, len(msg.tasks)))
        for part in p.runs(failed, 2, self.core.config.max_results_batch, self.core.config.max_message_bytes):
            self._send(self.client_sock, peer, p.Results(part))
        self._bad.warn("refused a batch of %d tasks from %r: %s", len(msg.tasks), peer[:16], self.journal_error)

    def _security(self) -> dict:
        if self.zap is not None:
            return {"mode": "curve", **self.zap.status()}
        return {"mode": "insecure" if self.insecure else "loopback only, no keys"}

    def stop(self, *_: Any) -> None:
        """Ask the loop to end after its current turn (safe from a signal handler)."""
        self._stop = True

    def serve(self) -> None:
        """Run until stop() is called; closes the sockets on the way out."""
        core = self.core
        tick_s = core.config.heartbeat_interval_s / 2
        poller = zmq.Poller()
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.executor_sock, zmq.POLLIN)
        zap = self.zap.socket if self.zap is not None else None
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        monitors = self.zap.monitors if self.zap is not None else []
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        next_tick = time.monotonic()
        # Snapshots and the turn histogram are for the HTTP side; events need neither.
        observer = self.observer if self.web is not None else None
        turns, clock = self.turns, time.perf_counter
        stall_s = max(STALL_S, core.config.heartbeat_interval_s)
        try:
            while not self._stop:
                # Blob chunks still to send: poll without waiting.
                wait_ms = 0 if self.streams else max(0.0, next_tick - time.monotonic()) * 1000
                due = time.monotonic() + wait_ms / 1000
                ready = dict(poller.poll(wait_ms))
                t0 = clock()
                now = time.monotonic()
                if now - due > stall_s:  # SIGSTOP, swap, a starved VM: not the executors' fault
                    core.stalled(now, now - due)
                if zap is not None and zap in ready:
                    self.zap.handle()
                if monitors and not ready.keys().isdisjoint(monitors):
                    self.zap.read_monitors()
                if self.client_sock in ready:
                    self._receive(self.client_sock, core.on_client, now, "client")
                if self.executor_sock in ready:
                    self._receive(self.executor_sock, core.on_executor, now, "executor")
                if now >= next_tick:
                    core.tick(now)
                    next_tick = now + tick_s
                core.dispatch(now)
                self._send_all()
                if self.streams:
                    self._pump_blobs()
                took = time.monotonic() - now
                if took > stall_s:  # a turn this long is a stall too: nothing was read meanwhile
                    core.stalled(now + took, took)
                if observer is not None:
                    turns.observe(clock() - t0)
                    if now >= observer.next_snapshot:
                        self._publish(now)
        finally:
            self.close()

    def _publish(self, now: float) -> None:
        """Hand the observers a snapshot of the status and counters (about once a second)."""
        t0 = time.perf_counter()
        by_state: dict[str, int] = {}
        for ex in self.core.executors.values():
            by_state[ex.state.value] = by_state.get(ex.state.value, 0) + 1
        status = status_report(self.core, now, detail=True).to_map()
        encoded = json.dumps(status, default=str).encode()
        self.observer.publish(Snapshot(time.time(), status, encoded, by_state, dict(self.messages),
                                       self.turns.copy(), time.perf_counter() - t0), now)

    def _receive(self, sock: zmq.Socket, handle: Callable[[bytes, Any, float], None],
                 now: float, port: str) -> None:
        if self.zap is not None:
            self._receive_keyed(sock, handle, now, port)
            return
        recv, clock = sock.recv_multipart, time.perf_counter
        stop = clock() + READ_S
        n = 0
        try:
            while n < _RECV_PER_TURN:
                frames = recv(_NOBLOCK)
                n += 1
                self._handle(frames, handle, now, port)
                if clock() > stop:
                    break
        except zmq.Again:
            pass
        self.messages[port, "in"] += n  # counted once a turn, not per message

    def _receive_keyed(self, sock: zmq.Socket, handle: Callable[[bytes, Any, float], None],
                       now: float, port: str) -> None:
        """As _receive, and each routing id stays with the CURVE key that first used it.

        Routing ids are visible (falconet executors lists them) and ROUTER_HANDOVER lets a
        new connection take one over, so without this check any holder of an executor key
        could speak as another executor and hand in forged results for its tasks.
        """
        owners = self._owners.setdefault(port, {})
        stop = time.perf_counter() + READ_S
        for _ in range(_RECV_PER_TURN):
            if time.perf_counter() > stop:
                return
            try:
                parts = sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.messages[port, "in"] += 1  # (with keys every message costs far more than this)
            peer, key = parts[0].bytes, parts[-1].get("User-Id")
            if owners.setdefault(peer, key) != key:
                self._bad.warn("dropped a message on the %s port: routing id %r belongs to another "
                               "key (%s...), not %s...", port, peer[:16], owners[peer][:8], key[:8])
                continue
            self._handle([f.bytes for f in parts], handle, now, port)

    def _handle(self, frames: list[bytes], handle: Callable[[bytes, Any, float], None],
                now: float, port: str) -> None:
        if len(frames) != 2:
            self._bad.warn("dropped a %d-frame message on the %s port: falconet messages "
                           "are one frame", len(frames) - 1, port)
            return
        peer, frame = frames
        try:
            msg = p.decode(frame, columns=True)  # the core reads record batches a column at a time
        except ProtocolError as exc:
            self._bad.warn("dropped a malformed message on the %s port from %r: %s",
                           port, peer[:16], exc)
            return
        try:
            if self.journal_error and type(msg) is p.Submit and port == "client" and self._is_new(peer, msg.batch):
                self._reject(peer, msg)
            elif type(msg) in p.BLOB_MESSAGES:
                self._blob(msg, peer, port)
            else:
                if type(msg) is p.Register:  # a (re)registering executor asks for its files afresh
                    self.streams.forget(self.executor_sock, {peer})
                handle(peer, msg, now)
        except Exception:  # the loop boundary: one bad message must not stop the service
            log.exception("error while handling %s from %r on the %s port",
                          type(msg).__name__, peer[:16], port)

    def _is_new(self, peer: bytes, batch: int) -> bool:
        """A batch this client has not had accepted (a re-sent one goes to the core, which
        knows it is in the journal already)."""
        client = self.core.clients.get(peer)
        return client is None or not (0 < batch <= client.batch_high or batch in client.batch_extra)

    # ------------------------------------------------------------ blobs (staged files)

    def _blob(self, msg: Any, peer: bytes, port: str) -> None:
        """PutBlob, GetBlob and DropBlobs from a known client or executor."""
        core = self.core
        known = core.knows_client(peer) if port == "client" else core.knows_executor(peer)
        if not known:
            core.answer_stranger(peer, port)  # sent with this turn's output
            return
        sock = self.client_sock if port == "client" else self.executor_sock
        if type(msg) is p.PutBlob:
            self._put_blob(msg, peer, port, sock)
        elif type(msg) is p.GetBlob:
            self._get_blob(msg, peer, sock)
        elif port == "client":  # DropBlobs
            self.holds.release(peer, msg.digests)

    def _get_blob(self, msg: p.GetBlob, peer: bytes, sock: zmq.Socket) -> None:
        """Send a peer one more window of a blob (see Streams)."""
        try:
            total = self.blobs.size(msg.digest)
        except staging.StagingError as exc:
            self._send(sock, peer, p.BlobData(msg.digest, msg.offset, 0, b"", f"not on the dispatcher: {exc}"))
            return
        if self.streams.ask(sock, peer, msg.digest, msg.offset, total):
            self.blob_counts["fetches"] += 1

    def _put_blob(self, msg: p.PutBlob, peer: bytes, port: str, sock: zmq.Socket) -> None:
        try:
            done = self.blobs.put(port.encode() + b":" + peer, msg.digest, msg.offset, msg.total, msg.data)
        except staging.StagingError as exc:
            self._bad.warn("refused a file from %s %r: %s", port, peer[:16], exc)
            if port == "client":
                self._send(sock, peer, p.Refused(f"file {msg.digest[:12]}... refused: {exc}"))
            return
        if done is None:
            return  # more chunks of its own copy to come
        holder = peer if port == "client" else b"executor:" + peer
        if self.holds.upload_chunk(holder, msg.digest, msg.offset + len(msg.data) >= msg.total):
            self.blob_counts["stored"] += 1

    def _settle_blobs(self, out: TurnOutput) -> None:
        """Hand executors' pins over to clients for the results accepted this turn; forget
        what executors that left were sending, being sent, or pinning."""
        for client, executor, files in out.delivered_files:
            try:
                found = {info["blob"] for _, info in staging.decode_result_files(files) if "blob" in info}
            except FalconetError:
                continue  # the client fails that task on its side
            self.holds.hand_over(b"executor:" + executor, client, found)
        # One that left and registered again within the turn keeps what it had.
        gone = {peer for peer in out.departed if not self.core.knows_executor(peer)}
        if gone:
            self.streams.forget(self.executor_sock, gone)
            for peer in gone:
                self.blobs.forget_peer(b"executor:" + peer)
                self.holds.drop_holder(b"executor:" + peer)

    def _pump_blobs(self) -> None:
        self.blob_counts["bytes_sent"] += self.streams.pump(BLOB_BYTES_PER_TURN, self._send, p.BlobData)

    def _send_all(self) -> None:
        # An unreachable executor can produce more output (failed tasks), hence the loop;
        # it ends because an unreachable executor is removed.
        commit = self._commit if self.journal is not None else None
        while True:
            out = self.core.take_output()
            if out.delivered_files or out.departed:
                self._settle_blobs(out)
            if out.events:
                self.observer.note(out.events)
            self.messages["client", "out"] += len(out.to_clients)
            self.messages["executor", "out"] += len(out.to_executors)
            unreachable = apply_output(out, commit, self._to_client, self._to_executor, self._held)
            if not unreachable:
                return
            for peer, msg in unreachable:
                self.core.executor_unreachable(peer, msg)

    @staticmethod
    def _send(sock: zmq.Socket, peer: bytes, msg: Any) -> bool:
        try:
            sock.send(peer, _SNDMORE_NOBLOCK)
            sock.send(p.encode(msg), _NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                return False
            raise

    def close(self) -> None:
        """Close both sockets and the context without waiting for unsent messages."""
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.observer is not None:
            self.observer.close()
            self.observer = None
        self.client_sock.close(0)
        self.executor_sock.close(0)
        if self.zap is not None:
            self.zap.close()
        self.ctx.term()
        if self.journal is not None:
            try:
                self.journal.close()
            except JournalWriteError as exc:  # their clients never heard Accepted: they send them again
                log.error("%s: %d bytes of the last records are not on disk", exc, self.journal.pending_bytes())
        if self._blob_tmp:
            shutil.rmtree(self._blob_tmp, ignore_errors=True)

