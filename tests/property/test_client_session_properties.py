"""Properties of the client's session: results resolve each future once with its value, in
any order and with any copies; batches keep the dispatcher's limits; and a rule-based
machine of submits, results, copies, cancels and restarts keeps its bookkeeping whole."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from falconet import protocol as p
from falconet import tasks
from falconet.client_session import ClientSession
from falconet.futures import TaskFuture

DONE, PYTHON = int(p.TaskState.DONE), int(p.TaskKind.PYTHON)


class Canceller:
    """The client side of TaskFuture.cancel(): tell the session."""

    def __init__(self, session: ClientSession):
        self.session = session

    def _cancel(self, seq: int) -> None:
        self.session.cancel(seq)


def welcomed(journal_id: str = "j1", **limits) -> ClientSession:
    s = ClientSession("c1", "test", "tcp://127.0.0.1:5555")
    s.start(0.0)
    s.handle(p.Welcome(p.PROTOCOL_VERSION, "d1", {"journal_id": journal_id, **limits}), 0.0)
    s.take_output()
    return s


def queue(s: ClientSession, seqs, body: bytes = b"") -> list[TaskFuture]:
    queued = [(p.TaskSpec(seq, PYTHON, body, 3, 0.0), TaskFuture(Canceller(s), seq, PYTHON)) for seq in seqs]
    s.add(queued)
    return [f for _, f in queued]


def result(seq: int, value) -> p.TaskResult:
    return p.TaskResult(seq, DONE, tasks.encode_python_value(value), "", "ex", 1, 0.0, 0.0, 0.0)


def sent(messages, kind) -> list:
    return [m for m in messages if type(m) is kind]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_interleaving_of_results_and_copies_resolves_each_future_once_with_its_value(data):
    n = data.draw(st.integers(1, 30), label="tasks")
    s = welcomed()
    futures = queue(s, range(1, n + 1))
    calls = Counter()
    for fut in futures:
        fut.add_done_callback(lambda f: calls.update([f.seq]))
    s.flush()
    s.take_output()
    # every task's result at least once, some more than once, in any order, in any bursts
    deliveries = data.draw(st.permutations(list(range(1, n + 1)) + data.draw(
        st.lists(st.integers(1, n), max_size=2 * n), label="copies")), label="order")
    acked: Counter = Counter()
    resolved: set[int] = set()
    i = 0
    while i < len(deliveries):
        size = data.draw(st.integers(1, 8), label="burst")
        burst = deliveries[i:i + size]
        i += size
        s.handle(p.Results([result(seq, seq * 7) for seq in burst]), 0.0)
        resolved |= set(burst)
        for msg in s.take_output().messages:
            acked.update(msg.seqs if type(msg) is p.Ack else [])
        # a task is outstanding exactly until its first result
        assert set(s.futures) == set(range(1, n + 1)) - resolved
    assert acked == Counter(deliveries)
    assert all(calls[fut.seq] == 1 and fut.result(0) == fut.seq * 7 for fut in futures)
    assert s.pending() == 0


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), max_size=40), max_batch=st.integers(1, 6),
       max_message_bytes=st.integers(200, 8000))
def test_batches_keep_order_and_the_dispatchers_limits_and_only_oversized_tasks_fail(sizes, max_batch,
                                                                                     max_message_bytes):
    s = welcomed(max_submit_batch=max_batch, max_message_bytes=max_message_bytes)
    budget = p.record_budget(max_message_bytes)
    futures = [queue(s, [seq], b"x" * size)[0] for seq, size in enumerate(sizes, 1)]
    s.flush()
    submits = sent(s.take_output().messages, p.Submit)
    fits = [seq for seq, size in enumerate(sizes, 1) if size + p.RECORD_OVERHEAD <= budget]
    assert [t.seq for m in submits for t in m.tasks] == fits
    for m in submits:
        assert 1 <= len(m.tasks) <= max_batch
        assert sum(len(t.body) + p.RECORD_OVERHEAD for t in m.tasks) <= budget
    for fut in futures:
        assert (fut.seq in fits) == (not fut.done())  # the rest failed with the reason
    assert sorted(s.unaccepted) == [m.batch for m in submits]


class SessionMachine(RuleBasedStateMachine):
    """Submits, flushes, starts, results (copies too), Accepted, cancels and journaled restarts."""

    def __init__(self):
        super().__init__()
        self.s = welcomed()
        self.next_seq = 1
        self.queued: list[int] = []  # in the outbox
        self.sent: dict[int, TaskFuture] = {}  # flushed, by seq
        self.futures: dict[int, TaskFuture] = {}
        self.results: set[int] = set()  # seqs whose result was delivered
        self.cancelled_first: set[int] = set()  # cancelled here before any result
        self.running: set[int] = set()  # told started while pending here
        self.calls: Counter = Counter()
        self.batches: dict[int, list[int]] = {}  # sent, not accepted
        self.dispatcher = 1
        self.now = 0.0

    @rule(n=st.integers(1, 5))
    def submit(self, n):
        seqs = list(range(self.next_seq, self.next_seq + n))
        self.next_seq += n
        for fut in queue(self.s, seqs):
            fut.add_done_callback(lambda f: self.calls.update([f.seq]))
            self.futures[fut.seq] = fut
        self.queued += seqs

    @rule()
    def flush(self):
        self.s.flush()
        for m in sent(self.s.take_output().messages, p.Submit):
            self.batches[m.batch] = [t.seq for t in m.tasks]
        for seq in self.queued:  # cancelled ones too: their Cancel follows them
            self.sent[seq] = self.futures[seq]
        self.queued = []

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def deliver(self, data):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.sent)), min_size=1, max_size=5))
        self.s.handle(p.Results([result(seq, -seq) for seq in seqs]), self.now)
        [ack] = sent(self.s.take_output().messages, p.Ack)
        assert ack.seqs == seqs
        self.results |= set(seqs)

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def start(self, data):
        """Started for some sent tasks, in any state here (finished, cancelled, told before)."""
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.sent)), min_size=1, max_size=5))
        self.s.handle(p.Started(seqs), self.now)
        assert self.s.take_output().messages == [], "Started is not answered"
        self.running |= {q for q in seqs if q not in self.results and q not in self.cancelled_first}

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def accept(self, data):
        batch = data.draw(st.sampled_from(sorted(self.batches)))
        self.s.handle(p.Accepted(batch, len(self.batches.pop(batch))), self.now)

    @precondition(lambda self: self.futures)
    @rule(data=st.data())
    def cancel(self, data):
        fut = self.futures[data.draw(st.sampled_from(sorted(self.futures)))]
        cancelled = fut.cancel()
        if fut.seq in self.running:
            assert not cancelled, "a running task cannot be cancelled"
        elif cancelled and fut.seq not in self.results:
            self.cancelled_first.add(fut.seq)

    @rule()
    def restart_from_the_journal(self):
        self.now += 1.0
        self.dispatcher += 1
        self.s.handle(p.HelloAgain("restarted"), self.now)
        assert sent(self.s.take_output().messages, p.Hello)
        self.s.handle(p.Welcome(p.PROTOCOL_VERSION, f"d{self.dispatcher}", {"journal_id": "j1"}), self.now)
        resent = sent(self.s.take_output().messages, p.Submit)
        assert {m.batch: [t.seq for t in m.tasks] for m in resent} == self.batches

    @invariant()
    def outstanding_until_the_result(self):
        assert set(self.s.futures) == set(self.sent) - self.results
        assert self.s.pending() == len(self.s.futures) + len(self.queued)

    @invariant()
    def running_until_the_result_and_outstanding_until_done(self):
        for seq, fut in self.futures.items():
            assert fut.running() == (seq in self.running and seq not in self.results)
        assert set(self.s.outstanding()) == {f for f in self.futures.values() if not f.done()}

    @invariant()
    def each_future_resolves_once_with_its_value(self):
        for seq, fut in self.futures.items():
            assert self.calls[seq] <= 1
            if seq in self.results and seq not in self.cancelled_first:
                assert fut.result(0) == -seq
            elif seq not in self.results and seq not in self.cancelled_first:
                assert not fut.done()


SessionMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_session_machine = SessionMachine.TestCase
