"""The dispatcher's state and rules, with no network code (sans-IO).

The ZeroMQ loop in :mod:`falconet.dispatcher.server` feeds decoded messages in with the
peer's routing id and the monotonic time, calls :meth:`Core.tick` and
:meth:`Core.dispatch`, and applies the :class:`TurnOutput` that :meth:`Core.take_output`
returns: journal records first, then messages.  Tests drive the same object directly.

The core is the event handler: sessions, the registry, the plain-task queue and its hot
dispatch loop.  Tasks with needs are placed by :mod:`.matching`, the journal is replayed
and snapshotted by :mod:`.replay`, and the status map is built by :mod:`.status`.
"""

from __future__ import annotations

import collections
import logging
import math
import operator
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat, starmap
from typing import Any, NamedTuple

from falconet import fields as f
from falconet import needs as nd
from falconet import protocol as p
from falconet.dispatcher import events as ev
from falconet.dispatcher import replay, sharing, states
from falconet.dispatcher.entries import (
    KINDS,
    RESULT_OVERHEAD,
    ClientEntry,
    Config,
    ExecutorEntry,
    ExecutorState,
    Task,
    caps_of,
    invalid_spec,
)
from falconet.dispatcher.matching import Matcher, NeedsClass
from falconet.dispatcher.records import Kind
from falconet.dispatcher.states import move_executor
from falconet.dispatcher.status import Rate, note_stats, status_report
from falconet.errors import ProtocolError
from falconet.protocol import TaskState
from falconet.reports import Fleet

REPORTED = frozenset({"security", "journal", "blobs"})  #: Status fields a reporter may fill

log = logging.getLogger("falconet.dispatcher")

_PENDING, _DISPATCHED, _RUNNING = int(TaskState.PENDING), int(TaskState.DISPATCHED), int(TaskState.RUNNING)
_DONE, _FAILED, _CANCELLED = int(TaskState.DONE), int(TaskState.FAILED), int(TaskState.CANCELLED)
_FINAL = frozenset({_DONE, _FAILED, _CANCELLED})
_LEGAL, _ENDS_ANY_WAY = states.LEGAL, states.ENDS_ANY_WAY
_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__
_OUTPUT = operator.itemgetter(2)  # TaskResult.output
_SEQ = operator.itemgetter(0)  # TaskSpec.seq, TaskResult.seq
_SPEC_FIELDS, _RESULT_FIELDS = len(p.TaskSpec._fields), len(p.ExecResult._fields)
_ZEROS = repeat(0.0)
#: the answer to a client that has not said Hello to this dispatcher (or to its last run)
_HELLO_AGAIN = p.HelloAgain("this dispatcher does not know this client (it restarted, or the client "
                            "skipped Hello): say Hello again")
#: the answer to an executor this dispatcher does not know
_REREGISTER = p.Reregister("unknown executor (declared lost, or the dispatcher restarted)")


class TurnOutput(NamedTuple):
    """Everything one turn produced, taken at once so the loop can keep the order: write
    and sync journal before sending any message."""

    journal: list[tuple[int, tuple]]  #: (Kind, fields) records; empty without a journal
    to_clients: list[tuple[bytes, Any]]  #: (peer, message)
    to_executors: list[tuple[bytes, Any]]  #: (peer, message)
    delivered_files: list[tuple[bytes, bytes, bytes]]  #: (client, executor, result files) accepted
    departed: list[bytes]  #: executors removed this turn (lost or left)
    events: list[tuple]  #: raw event records (falconet.dispatcher.observe); empty unless observed


class Core:
    """Queue, executor registry and result routing, driven by events."""

    def __init__(self, config: Config = Config(), wall: Callable[[], float] = time.time, *,
                 journal_id: str | None = None, reporters: dict[str, Callable[[], Any]] | None = None):
        """journal_id, the state directory's identity, turns journaling on (None: no journal);
        reporters fill status fields that the server knows: security, journal, blobs."""
        unknown = set(reporters or ()) - REPORTED
        if unknown:
            raise ValueError(f"reporters can fill only {', '.join(sorted(REPORTED))}, not {', '.join(sorted(unknown))}")
        self.config = config
        self.wall = wall
        self.dispatcher_id = uuid.uuid4().hex[:12]
        self.started_wall = wall()
        #: clients with plain tasks queued (each holds its own queue), in fair-share turn order
        self.plain: dict[bytes, ClientEntry] = {}
        self._weights = dict(config.client_weights)
        self._reserved: set[bytes] = set()  #: executors held for a large task in the last turn
        self.executors: dict[bytes, ExecutorEntry] = {}
        self.ready: dict[bytes, ExecutorEntry] = {}  # executors with credit > 0, in turn order
        self.matcher = Matcher(config, self.executors, self.ready, self._pop)  #: tasks with needs
        self.clients: dict[bytes, ClientEntry] = {}
        self.counts = [0] * len(TaskState)  # live tasks by state; final states are totals
        self.submitted_total = 0
        self.lost_total = 0
        self.resumed_at = -math.inf  #: monotonic time the loop came back from its last stall
        self._clients_checked = -math.inf
        self.stale_results = 0
        self.recent_lost: collections.deque[dict] = collections.deque(maxlen=20)
        self.rate = Rate(config.rate_window_s)  #: completions, for the tasks/s figure
        self._next_tid = 1
        self._results_pending: dict[bytes, ClientEntry] = {}
        self._started_pending: dict[bytes, ClientEntry] = {}  # clients with tasks started this turn
        self.to_clients: list[tuple[bytes, Any]] = []
        self.to_executors: list[tuple[bytes, Any]] = []
        self.endpoints: dict[str, str] = {}  #: bound addresses, set by the server, shown in status
        self.fleet: Fleet | None = None  #: the provisioner's last FleetReport
        self.fleet_at = 0.0
        self.fleet_reports = 0  #: FleetReports received; a new one may change what is launchable
        #: (Kind, fields) records for the journal; None when the dispatcher keeps no journal
        self.journal: list[tuple[int, tuple]] | None = None if journal_id is None else []
        self.journal_id = journal_id or ""  #: the state directory's identity, told to clients
        #: (client, executor, result files) of results with files accepted this turn
        self.delivered_files: list[tuple[bytes, bytes, bytes]] = []
        self.departed: list[bytes] = []  #: executors removed this turn
        self.cache_totals = {"hits": 0, "misses": 0, "bytes_fetched": 0}  #: executors' input caches, summed
        self.reporters: dict[str, Callable[[], Any]] = dict(reporters or {})  #: more status entries
        #: raw event records for the observer (falconet.dispatcher.observe); None: not observed
        self.events: list[tuple] | None = None
        #: answers an EventsRequest: (after, since, limit) -> reply map; set with the events
        self.event_source: Callable[[int, float, int], dict] | None = None

    def plain_tasks(self) -> Iterator[Task]:
        """Every plain task queued, client by client (cancelled ones not yet dropped included)."""
        for client in self.clients.values():
            yield from client.queue

    @property
    def classes(self) -> dict[nd.Needs, NeedsClass]:
        """Queued tasks with needs, by needs (the matcher's)."""
        return self.matcher.classes

    # ------------------------------------------------------------ state changes

    def _move(self, task: Task, new: int) -> None:
        old = task.state
        states.check(old, new)
        task.state = new
        self.counts[old] -= 1
        self.counts[new] += 1
        c = task.client.counts
        c[old] -= 1
        c[new] += 1

    def _finish(self, task: Task, state: int, output: bytes, reason: str, executor: str,
                started: float, finished: float, files: bytes = b"") -> None:
        # _move inlined: this runs once per task
        old = task.state
        if (old, state) not in _LEGAL:
            states.check(old, state)  # raises, naming both states
        task.state = state
        counts = self.counts
        counts[old] -= 1
        counts[state] += 1
        client = task.client
        c = client.counts
        c[old] -= 1
        c[state] += 1
        client.results.append(_new(p.TaskResult, (
            task.seq, state, output, reason, executor, task.attempt, task.submitted, started, finished, files)))
        self._results_pending[client.peer] = client

    # ------------------------------------------------------------ peers

    def knows_client(self, peer: bytes) -> bool:
        """True for a client that said Hello to this dispatcher."""
        client = self.clients.get(peer)
        return client is not None and client.welcomed

    def knows_executor(self, peer: bytes) -> bool:
        """True for a registered executor."""
        return peer in self.executors

    def answer_stranger(self, peer: bytes, port: str) -> None:
        """Queue the answer to a peer this dispatcher does not know on port ("client" or
        "executor"): HelloAgain for a client, Reregister for an executor."""
        if port == "client":
            self.to_clients.append((peer, _HELLO_AGAIN))
        else:
            self.to_executors.append((peer, _REREGISTER))

    # ------------------------------------------------------------ clients

    def on_client(self, peer: bytes, msg: Any, now: float) -> None:
        """Handle one decoded message from a client."""
        if type(msg) is p.Hello:
            self._hello(peer, msg)
            if peer in self.clients:
                self.clients[peer].last_seen = now
            return
        client = self.clients.get(peer)
        if client is None or not client.welcomed:
            if type(msg) in p.EXECUTOR_ONLY:
                self.to_clients.append((peer, self._wrong_port("client")))
            else:
                self.to_clients.append((peer, _HELLO_AGAIN))
            return
        client.last_seen = now
        if type(msg) is p.Submit:
            self._submit(client, msg)
        elif type(msg) is p.Ack:
            self._ack(client, msg.seqs)
        elif type(msg) is p.Cancel:
            self._cancel(client, set(msg.seqs))
        elif type(msg) is p.StatusRequest:
            self.to_clients.append((peer, p.StatusReply(msg.req_id, self.status(now, msg.detail, client))))
        elif type(msg) is p.Release:
            self._release(set(msg.executor_ids), msg.reason)
        elif type(msg) is p.FleetReport:
            self._fleet_report(peer, msg)
        elif type(msg) is p.EventsRequest:
            self._events_request(peer, msg)
        else:
            self.to_clients.append((peer, p.Refused(f"{type(msg).__name__} is not a client message")))

    def _events_request(self, peer: bytes, msg: p.EventsRequest) -> None:
        if self.event_source is None:
            self.to_clients.append((peer, p.StatusReply(msg.req_id, {
                "error": "this dispatcher keeps no events: it was started with --event-history 0"})))
            return
        limit = max(1, min(msg.limit, ev.MAX_PER_REQUEST))
        self.to_clients.append((peer, p.StatusReply(msg.req_id, self.event_source(msg.after, msg.since, limit))))

    def _fleet_report(self, peer: bytes, msg: p.FleetReport) -> None:
        old = self.fleet
        try:
            self.fleet = Fleet.from_map(msg.info)
        except ProtocolError as exc:
            self.to_clients.append((peer, p.Refused(f"fleet report ignored: {exc}")))
            return
        self.fleet_at = self.wall()
        self.fleet_reports += 1
        if self.events is not None:
            self.events += ev.fleet_changes(old, self.fleet, self.fleet_at)

    def _wrong_port(self, here: str) -> p.Refused:
        """The refusal for a peer of the other kind, naming the port it should use."""
        other = "executor" if here == "client" else "client"
        return p.Refused(p.wrong_port(here, self.endpoints.get(other, "").rpartition(":")[2]))

    def _hello(self, peer: bytes, msg: p.Hello) -> None:
        reason = p.check_version(msg.version)
        if reason:
            self.to_clients.append((peer, p.Refused(reason)))
            return
        client = self.clients.get(peer)
        if client is None:
            client = self.clients[peer] = ClientEntry(peer, msg.name)
        client.weight = self._weights.get(msg.name, 1.0)
        client.welcomed = True
        limits = {"max_submit_batch": self.config.max_submit_batch,
                  "max_message_bytes": self.config.max_message_bytes,
                  "max_task_bytes": self.config.max_task_bytes,
                  "max_output_bytes": self.config.max_output_bytes,
                  "journal": self.journal is not None, "journal_id": self.journal_id}
        self.to_clients.append((peer, p.Welcome(p.PROTOCOL_VERSION, self.dispatcher_id, limits)))
        # Results sent before and never acknowledged: the connection (or the dispatcher) died.
        resend = list(client.unacked.values())
        for part in self._chunks(resend, 2):
            self.to_clients.append((peer, p.Results(part)))

    def _submit(self, client: ClientEntry, msg: p.Submit) -> None:
        if len(msg.tasks) > self.config.max_submit_batch:
            self.to_clients.append((client.peer, p.Refused(
                f"batch {msg.batch} has {len(msg.tasks)} tasks, more than the limit of "
                f"{self.config.max_submit_batch}; submit in smaller batches")))
            return
        if not client.first_time(msg.batch):  # re-sent after a restart: it is in the journal
            self.to_clients.append((client.peer, p.Accepted(msg.batch, len(msg.tasks))))
            return
        wall = self.wall()
        if self.journal is not None:  # records, as the journal keeps them
            self.journal.append((Kind.SUBMIT, (client.peer, client.name, msg.batch, wall, list(msg.tasks))))
        columns = f.columns_of(msg.tasks, _SPEC_FIELDS)
        self._queue(client, msg.tasks, columns, wall)
        if self.events is not None:
            # the seqs only: the specs (and their bodies) must go with the turn, as without events
            self.events.append((ev.SUBMITTED, wall, client.label, columns[0]))
        self.to_clients.append((client.peer, p.Accepted(msg.batch, len(msg.tasks))))

    def _queue(self, client: ClientEntry, specs: list[p.TaskSpec], columns: list[list], wall: float) -> None:
        """Queue a batch of specs (its columns too: the usual batch is judged and queued
        from them, with no TaskSpec made)."""
        queue, counts, ccounts = client.queue, self.counts, client.counts
        counts[_PENDING] += len(specs)
        ccounts[_PENDING] += len(specs)
        max_body = self.config.max_task_bytes
        if self._plain_and_valid(columns, max_body):  # the usual batch: checked a column at a time
            queue.extend(map(Task, repeat(client), zip(*columns), repeat(wall)))
            specs_each: list[p.TaskSpec] = []
        else:
            specs_each = specs
        classes: dict[bytes, NeedsClass | str | None] = {}  # needs as sent -> its class, once per batch
        for spec in specs_each:
            if spec.kind in KINDS and spec.retries >= 0 and spec.walltime_s >= 0 and len(spec.body) <= max_body:
                if not spec.needs:
                    queue.append(Task(client, spec, wall))  # (NaN fails the walltime test)
                    continue
                cls = classes.get(spec.needs, False)
                if cls is False:
                    cls = classes[spec.needs] = self.matcher.class_of(spec.needs)
                if cls is None:
                    queue.append(Task(client, spec, wall))
                elif type(cls) is str:
                    self._finish(Task(client, spec, wall), _FAILED, b"", cls, "", 0.0, wall)
                else:
                    cls.queue.append(Task(client, spec, wall, cls.needs))
                    cls.pending += 1
            else:
                self._finish(Task(client, spec, wall), _FAILED, b"", invalid_spec(spec, max_body), "", 0.0, wall)
        self.submitted_total += len(specs)
        if queue and not client.held:
            self.plain.setdefault(client.peer, client)

    @staticmethod
    def _plain_and_valid(columns: list[list], max_body: int) -> bool:
        """True when every spec of a batch (its columns) is a plain task that passes the
        checks of _queue (a kind this dispatcher runs, retries and walltime_s >= 0, not NaN,
        a body within the limit)."""
        seqs, kinds, bodies, retries, walltimes, needs, _ = columns
        if not seqs or any(needs) or not set(kinds) <= KINDS:
            return False
        return min(retries) >= 0 and all(map(operator.ge, walltimes, _ZEROS)) and max(map(len, bodies)) <= max_body

    def _enqueue(self, task: Task, front: bool = False) -> None:
        """Queue a pending task: in its needs class, or a plain one in the plain queue."""
        if task.needs is None:
            queue = task.client.queue
            if not task.client.held:
                self.plain.setdefault(task.client.peer, task.client)
        else:
            cls = self.matcher.class_for(task.needs)
            cls.pending += 1
            queue = cls.queue
        (queue.appendleft if front else queue.append)(task)

    def _ack(self, client: ClientEntry, seqs: list[int]) -> None:
        gone = list(filter(None, map(client.unacked.pop, seqs, repeat(None))))  # unknown seqs: None
        client.unacked_bytes -= sum(map(len, map(_OUTPUT, gone))) + RESULT_OVERHEAD * len(gone)
        if client.held and client.unacked_bytes <= self.config.max_unacked_bytes * 3 // 4:
            client.held = False  # room again (with a margin, so it does not flap)
            log.info("client %s acknowledged its results: its tasks go on", client.label)
            if client.queue:
                self.plain[client.peer] = client
        if self.journal is not None:
            self.journal.append((Kind.ACK, (client.peer, seqs)))

    def _cancel(self, client: ClientEntry, seqs: set[int]) -> None:
        wall = self.wall()
        for task in client.queue:  # cancelled tasks stay in the deque and are skipped later
            if task.state == _PENDING and task.seq in seqs:
                self._finish(task, _CANCELLED, b"", "cancelled before it started", "", 0.0, wall)
        for cls in self.classes.values():
            for task in cls.queue:
                if task.client is client and task.state == _PENDING and task.seq in seqs:
                    self._finish(task, _CANCELLED, b"", "cancelled before it started", "", 0.0, wall)
                    cls.pending -= 1
        for ex in self.executors.values():
            tids = [t.tid for t in ex.tasks.values()
                    if t.client is client and t.state == _DISPATCHED and t.seq in seqs]
            if tids:
                self._send_executor(ex, p.CancelTasks(tids))

    def _release(self, ids: set[str], reason: str) -> None:
        for ex in self.executors.values():
            if ex.info.executor_id in ids:
                if move_executor(ex, ExecutorState.DRAINING):  # no new work from now on
                    log.info("executor %s released: %s", ex.info.executor_id, reason)
                    self._executor_event("released", ex, reason)
                ex.credit = 0
                self.ready.pop(ex.peer, None)
                self.matcher.changed(ex.peer, ex)
                self._send_executor(ex, p.Leave(reason))

    # ------------------------------------------------------------ executors

    def on_executor(self, peer: bytes, msg: Any, now: float) -> None:
        """Handle one decoded message from an executor."""
        ex = self.executors.get(peer)
        if type(msg) is p.Register:
            self._register(peer, msg, ex, now)
            return
        if ex is None:
            if type(msg) in p.CLIENT_ONLY:
                self.to_executors.append((peer, self._wrong_port("executor")))
            elif type(msg) is not p.Bye:
                self.to_executors.append((peer, _REREGISTER))
            return
        ex.last_seen = now
        kind = type(msg)
        if kind is p.Report:
            self._report(ex, msg, now)
        elif kind is p.Heartbeat:
            pass
        elif kind is p.Drain:
            self._drain(ex, msg)
        elif kind is p.Bye:
            self._remove(ex, lost=False)
        else:
            log.warning("executor %s sent %s, which is not an executor message; ignored", ex.info.executor_id, kind.__name__)

    def _register(self, peer: bytes, msg: p.Register, ex: ExecutorEntry | None, now: float) -> None:
        reason = p.check_version(msg.version)
        if not reason and msg.slots < 1:
            reason = f"an executor needs at least one slot, not {msg.slots}"
        if reason:
            self.to_executors.append((peer, p.Refused(reason)))
            return
        if ex is not None:  # a reconnect: keep what it still holds, requeue the rest
            held = {tid for tid, _ in msg.holding}
            for tid in [tid for tid in ex.tasks if tid not in held]:
                self._requeue(self._unhold(ex, tid), loss=False)
            move_executor(ex, ExecutorState.ACTIVE)
            ex.info, ex.credit, ex.last_seen = msg, 0, now
            ex.caps = caps_of(msg)
            self.ready.pop(peer, None)
        else:
            ex = self.executors[peer] = ExecutorEntry(peer, msg, now, self.wall())
            log.info("executor %s registered: host %s, %d slots, %d cpus, addresses %s, tags %s",
                     msg.executor_id, msg.hostname, msg.slots, msg.cpus, ",".join(msg.addresses),
                     ",".join(sorted(ex.caps.tags)))
            self._executor_event("joined", ex, f"{msg.slots} slots, {msg.cpus} cpus, {','.join(msg.addresses)}")
        self.matcher.changed(peer, ex)
        self._send_executor(ex, p.Registered(self.dispatcher_id, self.config.heartbeat_interval_s,
                                             self.config.heartbeat_timeout_s, self.config.max_message_bytes,
                                             self.config.max_output_bytes))

    def _report(self, ex: ExecutorEntry, msg: p.Report, now: float) -> None:
        tasks = ex.tasks
        if msg.started:
            # A task that also finishes in this report needs no Started: its result says more.
            ending = set(f.column(msg.results, 0)) if msg.results else ()  # ExecResult.tid
            last = None
            seen = None if self.events is None else []
            for tid, attempt in msg.started:
                t = tasks.get(tid)
                if t is not None and t.attempt == attempt and t.state == _DISPATCHED:
                    self._move(t, _RUNNING)
                    if seen is not None:
                        seen.append((t.client.label, t.seq, attempt))
                    if tid in ending:
                        continue
                    client = t.client
                    client.started.append(t.seq)  # told in one Started per client per turn
                    if client is not last:
                        self._started_pending[client.peer] = last = client
            if seen:
                self.events.append((ev.STARTED, self.wall(), ex.info.executor_id, seen))
        if msg.stats:
            note_stats(self.cache_totals, ex, msg.stats)
        if msg.results:
            accepted = self._accept_batch(ex, msg.results) or self._accept_each(ex, msg.results)
            ex.completed += accepted
            self.rate.note(now, accepted)
            if not tasks:
                ex.idle_since = now
        if msg.credit > 0 and ex.state is ExecutorState.ACTIVE:
            ex.credit += msg.credit
            self.ready[ex.peer] = ex

    def _accept_batch(self, ex: ExecutorEntry, results: list[p.ExecResult]) -> int:
        """Accept a Report's results a batch at a time (passes over its columns) when they
        are the usual case: each the current attempt of a distinct task held by ex, all of
        one client and one set of needs, in a final state reached by a legal move, with an
        output within the limit and no files.  Returns how many were accepted; 0 (nothing
        changed) leaves the batch to _accept_each, which judges each result on its own."""
        tids, attempts, states_, outputs, reasons, started, finished, files = f.columns_of(results, _RESULT_FIELDS)
        ts = list(map(ex.tasks.get, tids))
        new_set = set(states_)
        if None in ts or len(set(tids)) != len(tids) or any(files) or not new_set <= _FINAL:
            return 0
        # One loop reads the slots: far cheaper than an attrgetter pass per field.
        olds, held_attempts, clients, held_needs = [], [], set(), []
        for t in ts:
            olds.append(t.state)
            held_attempts.append(t.attempt)
            clients.add(t.client)
            held_needs.append(t.needs)
        old_set = set(olds)
        if (held_attempts != attempts or max(map(len, outputs)) > self.config.max_output_bytes
                or not (old_set <= _ENDS_ANY_WAY or set(zip(olds, states_)) <= _LEGAL)):
            return 0
        needs = held_needs[0]  # tasks of one needs class share one Needs object: count() compares identity first
        if len(clients) != 1 or held_needs.count(needs) != len(held_needs):
            return 0
        client = clients.pop()
        collections.deque(map(ex.tasks.__delitem__, tids), 0)
        seqs, submitted = [], []
        for t, state in zip(ts, states_):  # every move checked above
            t.state = state
            seqs.append(t.seq)
            submitted.append(t.submitted)
        self._count_moves(client, olds, old_set, states_, new_set)
        client.results += map(_new, repeat(p.TaskResult), zip(
            seqs, states_, outputs, reasons, repeat(ex.info.executor_id), attempts, submitted, started, finished, files))
        self._results_pending[client.peer] = client
        if needs is None:
            ex.cpus_used -= len(ts)  # a plain task holds one cpu
        else:
            ex.cpus_used -= needs.cpus * len(ts)
            ex.memory_used -= needs.memory_mb * len(ts)
        return len(ts)

    def _count_moves(self, client: ClientEntry, olds: list[int], old_set: set[int], news: list[int],
                     new_set: set[int]) -> None:
        """Count tasks of client moved from olds to news (the sets: the states in each)."""
        counts, c = self.counts, client.counts
        for state in old_set:  # a state or two: a count() pass each beats a Counter
            k = olds.count(state)
            counts[state] -= k
            c[state] -= k
        for state in new_set:
            k = news.count(state)
            counts[state] += k
            c[state] += k

    def _accept_each(self, ex: ExecutorEntry, results: list[p.ExecResult]) -> int:
        """Accept a Report's results one by one: stale ones counted and dropped, a bad state
        or an output over the limit failing its task.  Returns how many were accepted."""
        tasks, eid = ex.tasks, ex.info.executor_id
        accepted = plain = 0
        max_out = self.config.max_output_bytes
        for r in results:
            t = tasks.get(r.tid)
            if t is None or t.attempt != r.attempt:
                self.stale_results += 1
                continue
            del tasks[r.tid]
            if t.needs is None:
                plain += 1
            else:
                ex.cpus_used -= t.needs.cpus
                ex.memory_used -= t.needs.memory_mb
            state, reason, output = r.state, r.reason, r.output
            if state not in _FINAL:
                state, reason = _FAILED, f"executor reported invalid state {state}"
            if len(output) > max_out:
                state, output = _FAILED, b""
                reason = (f"its output of {len(r.output)} bytes is more than the dispatcher's "
                          f"limit of {max_out} (--max-output-bytes); lower the task's output cap, "
                          "or send its output to a file")
            if r.files:  # its outputs now belong to its client (the blob store counts them)
                self.delivered_files.append((t.client.peer, ex.peer, r.files))
            self._finish(t, state, output, reason, eid, r.started, r.finished, r.files)
            accepted += 1
        ex.cpus_used -= plain
        return accepted

    def _drain(self, ex: ExecutorEntry, msg: p.Drain) -> None:
        if move_executor(ex, ExecutorState.DRAINING):
            log.info("executor %s is draining", ex.info.executor_id)
            self._executor_event("drained", ex, "it asked to drain")
        ex.credit = 0
        self.ready.pop(ex.peer, None)
        self.matcher.changed(ex.peer, ex)
        for tid, attempt in msg.returned:
            t = ex.tasks.get(tid)
            if t is not None and t.attempt == attempt:
                self._requeue(self._unhold(ex, tid), loss=False)

    def _unhold(self, ex: ExecutorEntry, tid: int) -> Task:
        """Take a task off an executor, giving back the cpus and memory it held there."""
        t = ex.tasks.pop(tid)
        if t.needs is None:
            ex.cpus_used -= 1
        else:
            ex.cpus_used -= t.needs.cpus
            ex.memory_used -= t.needs.memory_mb
        return t

    def _requeue(self, task: Task, *, loss: bool, why: str = "") -> None:
        task.executor = None
        if task.state in _FINAL:
            return
        if loss:
            task.losses += 1
            if self.journal is not None:
                self.journal.append((Kind.LOSSES, (task.client.peer, [(task.seq, task.losses)])))
            if task.losses > task.retries:
                self._finish(task, _FAILED, b"", f"{why}; retry limit of {task.retries} reached after "
                             f"{task.attempt} attempts", "", 0.0, self.wall())
                return
        self._move(task, _PENDING)
        self._enqueue(task, front=True)  # it waited longest: run it next

    def _remove(self, ex: ExecutorEntry, *, lost: bool, how: str = "") -> None:
        del self.executors[ex.peer]
        move_executor(ex, ExecutorState.GONE)
        self.departed.append(ex.peer)
        self.ready.pop(ex.peer, None)
        self.matcher.changed(ex.peer, None)
        info = ex.info
        why = f"executor {info.executor_id} on {info.hostname} lost"
        for t in ex.tasks.values():
            self._requeue(t, loss=lost, why=why)
        if lost:
            self.lost_total += 1
            self.recent_lost.append({"id": info.executor_id, "host": info.hostname,
                                     "tasks": len(ex.tasks), "at": self.wall()})
            how = how or f"no message for {self.config.heartbeat_timeout_s:.1f}s"
            log.warning("%s (%s); %d tasks go back to the queue", why, how, len(ex.tasks))
            self._executor_event("lost", ex, f"{how}; {len(ex.tasks)} tasks back to the queue")
        else:
            log.info("executor %s left", info.executor_id)
            self._executor_event("left", ex, "")
        ex.tasks = {}

    def _executor_event(self, what: str, ex: ExecutorEntry, detail: str) -> None:
        if self.events is not None:
            self.events.append((ev.EXECUTOR, self.wall(), what, ex.info.executor_id, ex.info.hostname, detail))

    def executor_unreachable(self, peer: bytes, msg: Any) -> None:
        """The loop could not route msg to this executor: it is gone."""
        ex = self.executors.get(peer)
        if ex is None:
            return
        if type(msg) is p.Tasks:  # never arrived, so no attempt was made
            for a in msg.tasks:
                if a.tid in ex.tasks:
                    t = self._unhold(ex, a.tid)
                    t.attempt -= 1
                    self._requeue(t, loss=False)
        self._remove(ex, lost=True, how="its connection is gone")

    def _send_executor(self, ex: ExecutorEntry, msg: Any) -> None:
        self.to_executors.append((ex.peer, msg))

    # ------------------------------------------------------------ time and work

    def tick(self, now: float) -> None:
        """Declare silent executors lost and send heartbeats to quiet ones."""
        timeout = self.config.heartbeat_timeout_s
        # An executor only needs to hear from us within its timeout: three chances per timeout
        # keep 10,000 idle executors from costing a quarter of a core.
        interval = max(self.config.heartbeat_interval_s, timeout / 3)
        heard_by = now - timeout  # silent since before this: lost
        judge = self.resumed_at < heard_by  # after a stall, every executor has a full timeout again
        for ex in list(self.executors.values()):
            if judge and ex.last_seen < heard_by:
                self._remove(ex, lost=True)
            elif now - ex.last_sent >= interval:
                ex.last_sent = now
                self._send_executor(ex, p.Heartbeat())
        if self.matcher.classes:
            for cls, reason in self.matcher.check(now, self.fleet, self.fleet_reports):
                self._fail_class(cls, reason)
        if now - self._clients_checked >= 1.0 and self.resumed_at < now - 1.0:  # not right after a stall
            self._clients_checked = now
            sharing.check_clients(self, now)

    def stalled(self, now: float, for_s: float) -> None:
        """The loop did not run for for_s seconds (the process was paused, swapped out or
        starved): executors' messages of that time may not even have been read yet, so
        silence is measured from now, and no executor is lost (nor a retry spent) for it."""
        self.resumed_at = now
        log.warning("the dispatcher's loop stalled for %.1fs (paused, swapped out or starved of CPU); "
                    "executors get a full %.1fs from now before any is declared lost",
                    for_s, self.config.heartbeat_timeout_s)

    def _fail_class(self, cls: NeedsClass, reason: str) -> None:
        wall = self.wall()
        for t in cls.queue:
            if t.state == _PENDING:
                self._finish(t, _FAILED, b"", reason, "", 0.0, wall)
        cls.queue.clear()
        cls.pending = 0
        del self.matcher.classes[cls.needs]

    def dispatch(self, now: float) -> None:
        """Hand queued tasks to executors with credit: tasks with needs first, to executors
        that satisfy them and have their cpus free; then plain tasks, shared fairly."""
        # Reservations are found afresh each turn (each class remembers its own executor).
        matcher = self.matcher
        self._reserved = matcher.dispatch(now, self.to_executors) if matcher.classes and self.ready else set()
        plain, ready = self.plain, self.ready
        if not plain or not ready:
            return
        reserved = self._reserved
        candidates = [ex for ex in ready.values() if ex.peer not in reserved] if reserved else list(ready.values())
        total = sum(ex.credit for ex in candidates)
        # shares are of the work there was when this turn began
        queued = sum([len(c.queue) for c in plain.values()]) if len(plain) > 1 else len(next(iter(plain.values())).queue)
        short = queued < total
        limit = self.config.max_dispatch_batch
        wall = self.wall()
        for ex in candidates:
            if not plain:
                break
            n = ex.credit
            if short:
                n = min(n, math.ceil(queued * ex.credit / total))
            batch = self._take(ex, min(n, limit), wall)
            del ready[ex.peer]
            if ex.credit > 0:
                ready[ex.peer] = ex  # to the back of the line
            if batch:
                ex.last_sent = now
                self.to_executors.append((ex.peer, p.Tasks(batch)))

    def _take(self, ex: ExecutorEntry, n: int, wall: float) -> Sequence[p.Assignment]:
        plain = self.plain
        if len(plain) == 1:  # one client with work: the fast path
            client = next(iter(plain.values()))
            batch = self._pop(client.queue, ex, n, 1)
            if not client.queue:
                del plain[client.peer]
        else:
            batch = sharing.share(self, ex, n)
        ex.credit -= len(batch)
        ex.cpus_used += len(batch)
        return batch

    def _pop(self, queue: collections.deque[Task], ex: ExecutorEntry, n: int, cpus: int) -> Sequence[p.Assignment]:
        """Up to n pending tasks from the front of queue, dispatched to ex (the hot loop)."""
        if ex.ends_at:
            return self._pop_before_end(queue, ex, n, cpus)
        k = min(n, len(queue))
        if k > 1:
            ts = list(starmap(queue.popleft, repeat((), k)))
            client = ts[0].client
            for t in ts:  # a plain loop reads slots cheaper than a map pass per field
                if t.state != _PENDING or t.tid is not None or t.client is not client:
                    queue.extendleft(reversed(ts))  # not the usual case: one by one
                    break
            else:
                return self._pop_fresh(ts, ex, cpus)
        return self._pop_each(queue, ex, n, cpus)

    def _pop_before_end(self, queue: collections.deque[Task], ex: ExecutorEntry, n: int,
                        cpus: int) -> list[p.Assignment]:
        """_pop for an executor whose allocation ends (a batch job's walltime): a task whose
        walltime_s is longer than the time it has left stays queued, in its place, for an
        executor with more.  A task with no walltime goes: its length is unknown, and the
        executor stops taking work before its end.  At most 4n + 64 tasks are looked at."""
        left = ex.ends_at - self.wall()
        fits: collections.deque[Task] = collections.deque()
        skipped: list[Task] = []
        budget = 4 * n + 64
        while queue and len(fits) < n and budget:
            t = queue.popleft()
            budget -= 1
            (skipped if t.walltime_s > max(left, 0.0) and t.state == _PENDING else fits).append(t)
        batch = self._pop_each(fits, ex, n, cpus)  # takes every one of fits (at most n)
        queue.extendleft(reversed(skipped))
        return batch

    def _pop_each(self, queue: collections.deque[Task], ex: ExecutorEntry, n: int, cpus: int) -> list[p.Assignment]:
        """_pop one task at a time: skips cancelled ones, keeps the tids of re-runs."""
        tasks, Assignment = ex.tasks, p.Assignment
        batch: list[p.Assignment] = []
        append = batch.append
        while len(batch) < n and queue:
            t = queue.popleft()
            if t.state != _PENDING:
                continue  # cancelled while queued
            t.state = _DISPATCHED  # PENDING -> DISPATCHED is in the table; inlined for speed
            cc = t.client.counts
            cc[_PENDING] -= 1
            cc[_DISPATCHED] += 1
            t.attempt += 1
            t.executor = ex
            if t.tid is None:
                t.tid = self._next_tid
                self._next_tid += 1
            tasks[t.tid] = t
            append(_new(Assignment, (t.tid, t.attempt, t.kind, t.body, t.walltime_s, cpus, t.files)))
        self.counts[_PENDING] -= len(batch)
        self.counts[_DISPATCHED] += len(batch)
        return batch

    def _pop_fresh(self, ts: list[Task], ex: ExecutorEntry, cpus: int) -> f.Columns:
        """Dispatch to ex pending tasks of one client that were never dispatched (so have no
        tid and attempt 0), a batch at a time, the assignments made as the columns they
        travel in.  One plain loop: stores to slots are far cheaper there than through
        setattr in map passes (PENDING -> DISPATCHED is in the table)."""
        k = len(ts)
        tids = range(self._next_tid, self._next_tid + k)
        self._next_tid += k
        kinds, bodies, walltimes, files = [], [], [], []
        for t, tid in zip(ts, tids):
            t.tid = tid
            t.state = _DISPATCHED
            t.attempt = 1
            t.executor = ex
            kinds.append(t.kind)
            bodies.append(t.body)
            walltimes.append(t.walltime_s)
            files.append(t.files)
        ex.tasks.update(zip(tids, ts))
        for counts in (self.counts, ts[0].client.counts):
            counts[_PENDING] -= k
            counts[_DISPATCHED] += k
        return f.Columns(p.Assignment, [list(tids), [1] * k, kinds, bodies, walltimes, [cpus] * k, files])

    def take_output(self) -> TurnOutput:
        """Return and clear what this turn produced: journal records, messages, accepted
        result files and departed executors.  The records must be on disk before any of
        the messages is sent."""
        journal = self.journal
        if self._started_pending:  # before the Results: a task starts before it finishes
            for peer, client in self._started_pending.items():
                self.to_clients.append((peer, p.Started(client.started)))
                client.started = []
            self._started_pending.clear()
        events = self.events
        wall = self.wall() if events is not None and self._results_pending else 0.0
        for peer, client in self._results_pending.items():
            results, client.results = client.results, []
            if events is not None:
                events.append((ev.FINISHED, wall, client.label, results))
            client.unacked.update(zip(map(_SEQ, results), results))
            client.unacked_bytes += sum(map(len, map(_OUTPUT, results))) + RESULT_OVERHEAD * len(results)
            if client.unacked_bytes > self.config.max_unacked_bytes and not client.held:
                sharing.hold(self, client)
            for part in self._chunks(results, 2):
                if journal is not None:
                    journal.append((Kind.RESULTS, (peer, part)))
                self.to_clients.append((peer, p.Results(part)))
        self._results_pending.clear()
        out = TurnOutput(journal or [], self.to_clients, self.to_executors, self.delivered_files, self.departed,
                         events or [])
        if journal:
            self.journal = []
        if events:
            self.events = []
        self.to_clients, self.to_executors, self.delivered_files, self.departed = [], [], [], []
        return out

    def _chunks(self, records: list, field: int) -> Any:
        """records in runs that each fit one message and one journal record (protocol.runs)."""
        return p.runs(records, field, self.config.max_results_batch, self.config.max_message_bytes)

    # ------------------------------------------------------------ durability

    def restore(self, records: Any, now: float | None = None) -> int:
        """Rebuild the queue and the unacknowledged results from journal records.

        Every accepted task without a result is queued again (tasks that were running when
        the last dispatcher died run again: at-least-once).  Returns the tasks queued.
        now (monotonic, default: the clock's) starts the clients' silence.
        """
        live = replay.replay(records, self.clients)
        now = time.monotonic() if now is None else now
        for client in self.clients.values():
            client.weight = self._weights.get(client.name, 1.0)
            client.last_seen = now  # silence is counted from this start
            for r in client.unacked.values():
                self.counts[r.state] += 1
                client.counts[r.state] += 1
                client.unacked_bytes += len(r.output) + RESULT_OVERHEAD
        max_body = self.config.max_task_bytes
        for t in live:
            self.counts[_PENDING] += 1
            t.client.counts[_PENDING] += 1
            reason = invalid_spec(p.TaskSpec(t.seq, t.kind, t.body, t.retries, t.walltime_s, b"", t.files), max_body)
            if reason:  # limits may be lower than the last dispatcher's
                self._finish(t, _FAILED, b"", reason, "", 0.0, self.wall())
            else:
                self._enqueue(t)
        self.submitted_total += len(live)
        return len(live)

    def snapshot(self) -> Any:
        """The live state as journal records: what compaction keeps."""
        queues = [*(c.queue for c in self.clients.values()), *(cls.queue for cls in self.classes.values())]
        return replay.snapshot(self.clients.values(), self.executors.values(), queues, self._chunks)

    # ------------------------------------------------------------ statistics

    def status(self, now: float, detail: bool = False, client: ClientEntry | None = None) -> dict:
        """The dispatcher's statistics as a msgpack-friendly map (see :mod:`falconet.reports`)."""
        return status_report(self, now, detail, client).to_map()

