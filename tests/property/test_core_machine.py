"""A rule-based state machine over the dispatcher core: no task is lost, doubled or answered twice.

The machine plays clients and executors against one :class:`Core`, with an injected wall
clock and a monotonic ``now`` that only the ``tick`` rule moves.  It keeps its own model of
every task (who holds which attempt, per the ``Tasks`` messages the core sent) and of every
executor (registered or not, draining, outstanding credit, last sign of life), and the order
of each client's queue (submissions at the back, returned and lost work at the front).  It predicts
every message the core must send, and after each step compares the model with the core.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from falconet import protocol as p
from falconet.dispatcher.core import Config, Core, ExecutorState
from falconet.protocol import TaskState

CONFIG = Config(heartbeat_interval_s=1.0, heartbeat_timeout_s=10.0, max_dispatch_batch=4)
WALL0 = 1_700_000_000.0
PENDING, DISPATCHED, RUNNING = int(TaskState.PENDING), int(TaskState.DISPATCHED), int(TaskState.RUNNING)
DONE, FAILED, CANCELLED = int(TaskState.DONE), int(TaskState.FAILED), int(TaskState.CANCELLED)
UNKNOWN_SEQ = 10**6  # a seq no client ever uses

KINDS = st.sampled_from([1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 9])  # mostly valid; 0 and 9 are not task kinds
RETRIES = st.sampled_from([0, 0, 0, 1, 1, 1, 2, 2, 2, -1])  # -1 is invalid
WALLTIMES = st.sampled_from([0.0, 0.0, 2.5])


@dataclass
class Expect:
    """The one result the model predicts for a task, before the core sends it."""

    state: int
    executor: str
    attempts: int
    reason_has: str = ""
    record: p.ExecResult | None = None  # the executor's report, echoed in the result


@dataclass
class MTask:
    """The model's view of one submitted task."""

    client: bytes
    spec: p.TaskSpec
    submitted: float
    valid: bool
    tid: int | None = None  # learned from the first Assignment
    holder: bytes | None = None  # executor peer holding the current attempt, None when queued
    attempt: int = 0
    losses: int = 0
    started: bool = False
    expect: Expect | None = None
    results: list = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.valid and not self.results and self.expect is None


@dataclass
class MExec:
    """The model's view of one executor peer."""

    peer: bytes
    eid: str
    slots: int
    known: bool = False  # registered with the core (not lost, not gone with Bye)
    draining: bool = False
    credit: int = 0  # granted minus received
    last_seen: float = 0.0
    holding: dict = field(default_factory=dict)  # tid -> MTask, in the order the core assigned them
    old: set = field(default_factory=set)  # (tid, attempt) it ran once that are no longer current


class CoreMachine(RuleBasedStateMachine):
    """Clients and executors driving one Core, checked against a model after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.core = Core(CONFIG, wall=lambda: WALL0 + self.now)
        self.clients: list[bytes] = []
        self.execs: list[MExec] = []
        self.tasks: dict[tuple[bytes, int], MTask] = {}
        self.by_body: dict[bytes, MTask] = {}
        self.by_tid: dict[int, MTask] = {}
        self.queue: list[MTask] = []  # queued tasks, in the order the core must hand them out
        self.registry: list[bytes] = []  # registered executors, in the core's order
        self.next_seq: collections.Counter = collections.Counter()
        self.next_batch = 0
        self.next_req = 0
        self.expected_accepts: list[tuple[bytes, int, int]] = []
        self.expected_started: set[tuple[bytes, int]] = set()  # (client, seq) to be told started
        self.expected_welcomes: list[bytes] = []
        self.expected_status: dict[tuple[bytes, int], bool] = {}
        self.stale = 0
        self.lost = 0
        self.clean = True  # False while a step runs; teardown completes only after clean steps
        self.steps = 0
        self.completed_midway = False

    # ------------------------------------------------------------ model helpers

    def held(self, ex: MExec) -> list[MTask]:
        return list(ex.holding.values())

    def pending(self) -> list[MTask]:
        return self.queue

    def known(self) -> list[MExec]:
        return [self.exec_by_peer(peer) for peer in self.registry]

    def let_go(self, ex: MExec, t: MTask) -> None:
        """The attempt ex held is over (finished, returned or lost); a repeat of it is stale."""
        del ex.holding[t.tid]
        ex.old.add((t.tid, t.attempt))
        t.holder, t.started = None, False

    def requeue(self, ex: MExec, t: MTask) -> None:
        """The task leaves ex without a loss: it goes to the front of the queue."""
        self.let_go(ex, t)
        self.queue.insert(0, t)

    def forget(self, ex: MExec) -> None:
        ex.known, ex.draining, ex.credit = False, False, 0
        self.registry.remove(ex.peer)

    def lose(self, ex: MExec) -> None:
        """The core declares ex lost: its tasks cost a retry each, and fail past the limit."""
        self.forget(ex)
        self.lost += 1
        for t in self.held(ex):
            self.let_go(ex, t)
            t.losses += 1
            if t.losses > t.spec.retries:
                t.expect = Expect(FAILED, "", t.attempt, "lost")
            else:
                self.queue.insert(0, t)

    def expect_reregister(self, ex: MExec) -> list:
        return [] if ex.known else [(ex.peer, p.Reregister)]

    def touch(self, ex: MExec) -> None:
        if ex.known:
            ex.last_seen = self.now

    # ------------------------------------------------------------ outgoing messages

    def pump(self, expect_exec=(), *, tasks_ok=False, heartbeats_ok=False, cancels=None) -> list:
        """Take everything the core wants to send and check it against the model."""
        out = self.core.take_output()
        to_clients, to_executors = out.to_clients, out.to_executors
        for peer, msg in to_clients:
            self.on_client_msg(peer, msg)
        seen = collections.Counter()
        tasks_msgs = []
        for peer, msg in to_executors:
            kind = type(msg)
            if kind is p.Tasks:
                assert tasks_ok, f"Tasks sent to {peer!r} outside dispatch"
                self.on_tasks(peer, msg)
                tasks_msgs.append((peer, msg))
                continue
            if kind is p.Heartbeat:
                assert heartbeats_ok, "Heartbeat sent outside tick"
                assert self.exec_by_peer(peer).known, "Heartbeat to an executor the core dropped"
                continue
            if kind is p.CancelTasks:
                assert cancels is not None and sorted(msg.tids) == cancels.get(peer), (peer, msg)
            seen[(peer, kind)] += 1
        expected = collections.Counter(expect_exec)
        if cancels:
            expected.update((peer, p.CancelTasks) for peer in cancels)
        assert seen == expected, f"executor messages {dict(seen)} != expected {dict(expected)}"
        assert not self.expected_accepts, f"no Accepted for {self.expected_accepts}"
        assert not self.expected_started, f"no Started for {self.expected_started}"
        assert not self.expected_welcomes, f"no Welcome for {self.expected_welcomes}"
        assert not self.expected_status, f"no StatusReply for {self.expected_status}"
        missing = [(t.client, t.spec.seq) for t in self.tasks.values() if t.expect is not None]
        assert not missing, f"results expected but not sent: {missing}"
        return tasks_msgs

    def pick_exec(self, data) -> MExec:
        """Any executor, but mostly one that holds tasks when there is one: that is where bugs hide."""
        busy = self._held_by_known()
        if busy and data.draw(st.integers(0, 3)) != 0:
            return data.draw(st.sampled_from(busy))
        return data.draw(st.sampled_from(self.execs))

    def exec_by_peer(self, peer: bytes) -> MExec:
        return next(e for e in self.execs if e.peer == peer)

    def on_client_msg(self, peer: bytes, msg) -> None:
        kind = type(msg)
        if kind is p.Welcome:
            self.expected_welcomes.remove(peer)
        elif kind is p.Accepted:
            self.expected_accepts.remove((peer, msg.batch, msg.count))
        elif kind is p.Started:  # each start told once, to its own client, in the same turn
            for seq in msg.seqs:
                self.expected_started.remove((peer, seq))
        elif kind is p.Results:
            for r in msg.results:
                self.on_result(peer, r)
        elif kind is p.StatusReply:
            self.check_status(msg.info, self.expected_status.pop((peer, msg.req_id)))
        elif kind in (p.Refused, p.HelloAgain):
            assert peer not in self.clients, f"client {peer!r} refused: {msg.reason}"
        else:
            raise AssertionError(f"unexpected {kind.__name__} to client {peer!r}")

    def on_result(self, peer: bytes, r: p.TaskResult) -> None:
        t = self.tasks[(peer, r.seq)]
        assert not t.results, f"second result for {(peer, r.seq)}: {t.results[0]} then {r}"
        exp = t.expect
        assert exp is not None, f"result the model did not predict: {r}"
        assert (r.state, r.executor, r.attempts) == (exp.state, exp.executor, exp.attempts), (r, exp)
        assert exp.reason_has in r.reason, (r.reason, exp.reason_has)
        assert r.submitted == t.submitted
        if exp.record is not None:
            rec = exp.record
            assert (r.output, r.reason, r.started, r.finished) == (
                rec.output, rec.reason, rec.started, rec.finished)
        t.results.append(r)
        t.expect = None

    def on_tasks(self, peer: bytes, msg: p.Tasks) -> None:
        ex = self.exec_by_peer(peer)
        assert ex.known and not ex.draining, f"Tasks to {peer!r}, which may not take work"
        assert 0 < len(msg.tasks) <= ex.credit, f"{len(msg.tasks)} tasks against credit {ex.credit}"
        assert len(msg.tasks) <= CONFIG.max_dispatch_batch
        ex.credit -= len(msg.tasks)
        for a in msg.tasks:
            t = self.by_body[a.body]
            assert t.live and t.holder is None, f"dispatched a task that is not queued: {a}"
            # Each client's queue is first in, first out; free slots go round the clients.
            head = next(q for q in self.queue if q.client == t.client)
            assert head is t, f"dispatched {a.body!r} before {head.spec.body!r} of the same client"
            self.queue.remove(t)
            assert a.attempt == t.attempt + 1, (a, t.attempt)
            assert (a.kind, a.walltime_s) == (t.spec.kind, t.spec.walltime_s)
            if t.tid is None:
                assert a.tid not in self.by_tid
                t.tid = a.tid
                self.by_tid[a.tid] = t
            assert a.tid == t.tid
            t.attempt, t.holder, t.started = a.attempt, peer, False
            ex.holding[a.tid] = t

    def check_status(self, info: dict, detail: bool) -> None:
        assert info["queued"] == len(self.pending())
        assert info["executors"] == len(self.known())
        assert info["stale_results"] == self.stale
        assert info["lost_executors"] == self.lost
        assert info["busy"] == sum(len(e.holding) for e in self.known())
        assert ("executor_table" in info) == detail

    # ------------------------------------------------------------ setup

    @initialize(n_clients=st.integers(1, 2), slots=st.lists(st.integers(1, 3), min_size=1, max_size=4))
    def setup(self, n_clients, slots):
        self.clean = False
        for i in range(n_clients):
            peer = b"c%d" % i
            self.clients.append(peer)
            self.expected_welcomes.append(peer)
            self.core.on_client(peer, p.Hello(p.PROTOCOL_VERSION, f"client-{i}", f"name-{i}"), self.now)
        expect = []
        for i, n in enumerate(slots):
            ex = MExec(b"e%d" % i, f"exec-{i}", n)
            self.execs.append(ex)
            self.send_register(ex, n, [])
            expect.append((ex.peer, p.Registered))
            self.core.on_executor(ex.peer, p.Report(n, [], []), self.now)  # as a fresh agent does
            ex.credit = n
        self.pump(expect)

    @initialize(data=st.data())
    def first_batches(self, data):
        """Each client starts with some valid work, so executors have something to hold."""
        self.clean = False
        valid = st.tuples(st.sampled_from([1, 2]), st.integers(0, 2), st.just(0.0))
        for client in self.clients:
            self.submit_batch(client, data.draw(st.lists(valid, max_size=6)))

    def send_register(self, ex: MExec, slots: int, holding: list, version=p.PROTOCOL_VERSION) -> None:
        msg = p.Register(version, ex.eid, f"host-{ex.eid}", ["10.0.0.1", "fe80::1"], 4, 1024,
                         "linux", slots, 100, {"instance_type": "t3.micro"}, holding)
        self.core.on_executor(ex.peer, msg, self.now)
        if version != p.PROTOCOL_VERSION:
            return  # refused: nothing changes
        if ex.known:  # a reconnect: what it no longer holds goes back to the queue
            kept = {tid for tid, _ in holding}
            for t in self.held(ex):
                if t.tid not in kept:
                    self.requeue(ex, t)
        else:
            self.registry.append(ex.peer)
        ex.known, ex.draining, ex.credit, ex.slots, ex.last_seen = True, False, 0, slots, self.now

    # ------------------------------------------------------------ client rules

    @rule(data=st.data(), specs=st.lists(st.tuples(KINDS, RETRIES, WALLTIMES), max_size=6))
    def submit(self, data, specs):
        self.clean = False
        self.submit_batch(data.draw(st.sampled_from(self.clients)), specs)

    def submit_batch(self, client: bytes, specs: list[tuple[int, int, float]]) -> None:
        """Submit tasks of these (kind, retries, walltime); predict Accepted and the invalid ones' results."""
        batch = []
        for kind, retries, walltime_s in specs:
            seq = self.next_seq[client]
            self.next_seq[client] += 1
            spec = p.TaskSpec(seq, kind, b"%s|%d" % (client, seq), retries, walltime_s)
            t = MTask(client, spec, WALL0 + self.now, valid=kind in (1, 2) and retries >= 0)
            if kind not in (1, 2):
                t.expect = Expect(FAILED, "", 0, f"unknown task kind {kind}")
            elif retries < 0:
                t.expect = Expect(FAILED, "", 0, "retries")
            self.tasks[(client, seq)] = t
            self.by_body[spec.body] = t
            if t.valid:
                self.queue.append(t)
            batch.append(spec)
        self.next_batch += 1
        self.expected_accepts.append((client, self.next_batch, len(batch)))
        self.core.on_client(client, p.Submit(self.next_batch, batch), self.now)
        self.pump()

    @rule(data=st.data())
    def cancel(self, data):
        self.clean = False
        client = data.draw(st.sampled_from(self.clients))
        mine = [seq for (c, seq) in self.tasks if c == client]
        busy = [seq for seq in mine if self.tasks[(client, seq)].holder is not None]
        seqs = set(data.draw(st.lists(st.sampled_from(mine), max_size=3))) if mine else set()
        if busy:  # held tasks are the interesting ones: started or not decides what happens
            seqs |= set(data.draw(st.lists(st.sampled_from(busy), max_size=3)))
        if data.draw(st.booleans()):
            seqs.add(UNKNOWN_SEQ)
        cancels: dict[bytes, list[int]] = {}
        for seq in seqs:
            t = self.tasks.get((client, seq))
            if t is None or not t.live:
                continue
            if t.holder is None:
                t.expect = Expect(CANCELLED, "", t.attempt, "cancelled")
                self.queue.remove(t)
            elif not t.started:
                cancels.setdefault(t.holder, []).append(t.tid)
        for tids in cancels.values():
            tids.sort()
        self.core.on_client(client, p.Cancel(sorted(seqs)), self.now)
        self.pump(cancels=cancels)

    @rule(data=st.data(), detail=st.booleans())
    def status(self, data, detail):
        self.clean = False
        client = data.draw(st.sampled_from(self.clients))
        self.next_req += 1
        self.expected_status[(client, self.next_req)] = detail
        self.core.on_client(client, p.StatusRequest(self.next_req, detail), self.now)
        self.pump()

    # ------------------------------------------------------------ executor rules

    @rule(data=st.data(), slots=st.integers(1, 3), bad_version=st.integers(0, 9), credit=st.integers(0, 3))
    def register(self, data, slots, bad_version, credit):
        """(Re-)register, saying which of its tasks it still holds, then ask for work."""
        self.clean = False
        ex = self.pick_exec(data)
        held = [(t.tid, t.attempt) for t in self.held(ex)]
        holding = data.draw(st.lists(st.sampled_from(held), unique=True)) if held else []
        current = {tid for tid, _ in held}
        old = sorted(pair for pair in ex.old if pair[0] not in current)
        if old:
            holding += data.draw(st.lists(st.sampled_from(old), unique=True, max_size=2))
        if bad_version == 0:
            self.send_register(ex, slots, holding, p.PROTOCOL_VERSION + 1)
            self.pump([(ex.peer, p.Refused)])
            return
        self.send_register(ex, slots, holding)
        self.pump([(ex.peer, p.Registered)])
        self.send_credit(ex, credit)

    @rule(data=st.data(), credit=st.integers(1, 3))
    def report_credit(self, data, credit):
        self.clean = False
        self.send_credit(data.draw(st.sampled_from(self.execs)), credit)

    def send_credit(self, ex: MExec, credit: int) -> None:
        expect = self.expect_reregister(ex)
        self.touch(ex)
        if ex.known and not ex.draining:
            ex.credit += credit
        self.core.on_executor(ex.peer, p.Report(credit, [], []), self.now)
        self.pump(expect)

    # No arguments, so hypothesis sorts it first and draws it most: the server dispatches
    # on every turn too.
    @rule()
    def dispatch(self):
        self.clean = False
        self.dispatch_and_check()

    def dispatch_and_check(self) -> list:
        could = bool(self.pending()) and any(e.credit > 0 for e in self.known() if not e.draining)
        self.core.dispatch(self.now)
        sent = self.pump(tasks_ok=True)
        assert bool(sent) == could, "dispatch made no progress though work and credit were there"
        return sent

    @rule(data=st.data())
    def dispatch_to_vanished_executor(self, data):
        """Dispatch, and the loop cannot route one Tasks message: that executor is gone."""
        self.clean = False
        sent = self.dispatch_and_check()
        if not sent:
            return
        peer, msg = data.draw(st.sampled_from(sent))
        ex = self.exec_by_peer(peer)
        for a in msg.tasks:  # never arrived: no attempt made, no retry spent
            t = ex.holding.pop(a.tid)
            t.attempt -= 1
            t.holder, t.started = None, False
            self.queue.insert(0, t)
        self.lose(ex)
        self.core.executor_unreachable(peer, msg)
        self.pump()

    def _held_by_known(self, unstarted: bool = False) -> list[MExec]:
        return [e for e in self.known() if any(not (unstarted and t.started) for t in self.held(e))]

    @precondition(lambda self: self._held_by_known(unstarted=True))
    @rule(data=st.data())
    def report_started(self, data):
        self.clean = False
        ex = data.draw(st.sampled_from(self._held_by_known(unstarted=True)))
        fresh = [t for t in self.held(ex) if not t.started]
        chosen = data.draw(st.lists(st.sampled_from(fresh), unique_by=lambda t: t.tid, min_size=1))
        started = [(t.tid, t.attempt) for t in chosen]
        others = [t for t in fresh if t not in chosen]
        if others:  # the wrong attempt of a task it holds but does not start: ignored
            started.insert(data.draw(st.integers(0, len(started))), (others[0].tid, others[0].attempt + 5))
        for t in chosen:
            t.started = True
            self.expected_started.add((t.client, t.spec.seq))
        self.touch(ex)
        self.core.on_executor(ex.peer, p.Report(0, started, []), self.now)
        self.pump()

    @precondition(lambda self: self._held_by_known())
    @rule(data=st.data(), extra=st.integers(-1, 2))
    def report_results(self, data, extra):
        """Finish some held tasks with the right attempt, some started in the same report."""
        self.clean = False
        ex = data.draw(st.sampled_from(self._held_by_known()))
        chosen = data.draw(st.lists(st.sampled_from(self.held(ex)), unique_by=lambda t: t.tid, min_size=1))
        started, results = [], []
        for t in chosen:
            start_now = not t.started and data.draw(st.booleans())
            if start_now:  # started and finished in one report: the Results alone tell the client
                started.append((t.tid, t.attempt))
            states = [DONE, FAILED] if (t.started or start_now) else [DONE, FAILED, CANCELLED]
            state = data.draw(st.sampled_from(states))
            reason = "" if state == DONE else f"reason {t.tid}"
            rec = p.ExecResult(t.tid, t.attempt, state, b"out %d" % t.tid, reason,
                               WALL0 + self.now - 1.0, WALL0 + self.now)
            results.append(rec)
            t.expect = Expect(state, ex.eid, t.attempt, reason, rec)
            self.let_go(ex, t)
        credit = max(0, len(results) + extra)  # mostly the slots the results freed
        self.touch(ex)
        if not ex.draining:
            ex.credit += credit
        self.core.on_executor(ex.peer, p.Report(credit, started, results), self.now)
        self.pump()

    @precondition(lambda self: any(e.old for e in self.execs) or self._held_by_known())
    @rule(data=st.data())
    def stale_result(self, data):
        """A result for an attempt that is no longer current: from an old run or the wrong attempt."""
        self.clean = False
        candidates = [e for e in self.execs if e.old] + self._held_by_known()
        ex = data.draw(st.sampled_from(candidates))
        pairs = sorted(ex.old)
        for t in self.held(ex):
            pairs.append((t.tid, t.attempt - 1 if t.attempt > 1 else t.attempt + 7))
        tid, attempt = data.draw(st.sampled_from(pairs))
        t = self.by_tid[tid]
        assert not (t.holder == ex.peer and t.attempt == attempt), "the model picked a current attempt"
        rec = p.ExecResult(tid, attempt, DONE, b"late", "", WALL0, WALL0 + self.now)
        expect = self.expect_reregister(ex)
        if ex.known:
            self.stale += 1
        self.touch(ex)
        self.core.on_executor(ex.peer, p.Report(0, [], [rec]), self.now)
        self.pump(expect)

    @rule(data=st.data())
    def heartbeat(self, data):
        """Any executor, registered or lost, says it is alive; a lost one is told to register."""
        self.clean = False
        ex = data.draw(st.sampled_from(self.execs))
        expect = self.expect_reregister(ex)
        self.touch(ex)
        self.core.on_executor(ex.peer, p.Heartbeat(), self.now)
        self.pump(expect)

    @rule(data=st.data())
    def drain(self, data):
        """Take no more work, handing back tasks never started (plus one wrong attempt, ignored)."""
        self.clean = False
        ex = self.pick_exec(data)
        fresh = [t for t in self.held(ex) if not t.started]
        returned = data.draw(st.lists(st.sampled_from(fresh), unique_by=lambda t: t.tid)) if fresh else []
        pairs = [(t.tid, t.attempt) for t in returned]
        if fresh and data.draw(st.booleans()):
            pairs.append((fresh[0].tid, fresh[0].attempt + 3))
        expect = self.expect_reregister(ex)
        self.touch(ex)
        if ex.known:
            ex.draining, ex.credit = True, 0
            for t in returned:
                self.requeue(ex, t)
        self.core.on_executor(ex.peer, p.Drain(pairs), self.now)
        self.pump(expect)

    @rule(data=st.data())
    def bye(self, data):
        """The executor leaves; whatever it still held goes back without costing a retry."""
        self.clean = False
        ex = self.pick_exec(data)
        if ex.known:
            for t in self.held(ex):
                self.requeue(ex, t)
            self.forget(ex)
        self.core.on_executor(ex.peer, p.Bye(), self.now)
        self.pump()

    @rule(dt=st.sampled_from([0.0, 0.5, 0.5, 1.0, 1.0, 2.5, 10.0, 10.5]))  # 10.0: exactly the timeout
    def tick(self, dt):
        """Time passes; executors silent for longer than the timeout are lost."""
        self.clean = False
        self.now += dt
        for ex in self.known():
            if self.now - ex.last_seen > CONFIG.heartbeat_timeout_s:
                self.lose(ex)
        self.core.tick(self.now)
        self.pump(heartbeats_ok=True)

    # Once per run, half way: completing empties every queue, so more often would leave
    # little for the other rules to work on.  Teardown completes every run again.
    @precondition(lambda self: self.steps >= 25 and not self.completed_midway)
    @rule()
    def run_to_completion(self):
        """If executors keep reporting everything, every task ends with exactly one result."""
        self.clean = False
        self.completed_midway = True
        self.complete()

    def complete(self) -> None:
        if not any(not e.draining for e in self.known()):
            ex = self.execs[0]
            self.send_register(ex, ex.slots, [(t.tid, t.attempt) for t in self.held(ex)])
            self.pump([(ex.peer, p.Registered)])
        for _ in range(100):
            if all(t.results for t in self.tasks.values()):
                break
            for ex in self.known():
                results = []
                for t in self.held(ex):
                    rec = p.ExecResult(t.tid, t.attempt, DONE, b"", "", WALL0, WALL0 + self.now)
                    results.append(rec)
                    t.expect = Expect(DONE, ex.eid, t.attempt, "", rec)
                    self.let_go(ex, t)
                credit = 0 if ex.draining else ex.slots
                ex.credit += credit
                ex.last_seen = self.now
                self.core.on_executor(ex.peer, p.Report(credit, [], results), self.now)
                self.pump()
            self.core.dispatch(self.now)
            self.pump(tasks_ok=True)
        unanswered = [(t.client, t.spec.seq) for t in self.tasks.values() if len(t.results) != 1]
        assert not unanswered, f"tasks without exactly one result: {unanswered}"

    # ------------------------------------------------------------ invariants

    @invariant()
    def model_matches_core(self):
        core = self.core
        for client in self.clients:
            queued = [t.seq for t in core.plain_tasks() if t.state == PENDING and t.client.peer == client]
            assert queued == [t.spec.seq for t in self.queue if t.client == client], "a client's queue order differs"
        places: dict[tuple[bytes, int], list] = collections.defaultdict(list)
        for t in core.plain_tasks():
            if t.state == PENDING:
                places[(t.client.peer, t.seq)].append((None, t))
            else:  # cancelled while queued, left for dispatch to skip
                assert t.state == CANCELLED, TaskState(t.state)
        for peer, ex in core.executors.items():
            for tid, t in ex.tasks.items():
                assert t.tid == tid and t.executor is ex
                assert t.state in (DISPATCHED, RUNNING), TaskState(t.state)
                places[(t.client.peer, t.seq)].append((peer, t))
        for key, mt in self.tasks.items():
            where = places.pop(key, [])
            if mt.results:
                assert not where, f"finished task {key} is still at {[w for w, _ in where]}"
                continue
            assert mt.valid, f"invalid task {key} has no result"
            assert len(where) == 1, f"task {key} is in {len(where)} places: {[w for w, _ in where]}"
            holder, t = where[0]
            assert holder == mt.holder, f"task {key}: core has it at {holder!r}, model at {mt.holder!r}"
            assert t.attempt == mt.attempt
            if holder is not None:
                assert t.state == (RUNNING if mt.started else DISPATCHED)
        assert not places, f"the core holds tasks nobody submitted: {list(places)}"
        self.check_counts()
        self.check_executors()
        self.steps += 1
        self.clean = True

    def check_counts(self) -> None:
        def recount(tasks) -> list[int]:
            counts = [0] * len(TaskState)
            for t in tasks:
                if t.results:
                    counts[t.results[0].state] += 1
                elif t.holder is None:
                    counts[PENDING] += 1
                else:
                    counts[RUNNING if t.started else DISPATCHED] += 1
            return counts

        assert self.core.counts == recount(self.tasks.values())
        for peer in self.clients:
            mine = [t for t in self.tasks.values() if t.client == peer]
            assert self.core.clients[peer].counts == recount(mine), peer
        assert self.core.submitted_total == len(self.tasks)

    def check_executors(self) -> None:
        core = self.core
        assert list(core.executors) == self.registry
        for ex in self.known():
            entry = core.executors[ex.peer]
            assert list(entry.tasks) == list(ex.holding)
            assert entry.credit == ex.credit, (ex.peer, entry.credit, ex.credit)
            assert (entry.state is ExecutorState.DRAINING) == ex.draining
            assert entry.last_seen == ex.last_seen
        takers = {e.peer for e in self.known() if not e.draining and e.credit > 0}
        assert set(core.ready) == takers
        assert core.stale_results == self.stale
        assert core.lost_total == self.lost

    def teardown(self):
        if self.clean:  # after a failed step the model is not worth completing
            self.complete()


CoreMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestCoreMachine = CoreMachine.TestCase
