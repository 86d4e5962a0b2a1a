"""Example tests of the dispatcher core, driven directly: no sockets, an injected clock."""

from __future__ import annotations

import pytest

from falconet import protocol as p
from falconet.dispatcher.core import Config, Core
from falconet.protocol import TaskState

WALL0 = 1_700_000_000.0
TIMEOUT_S = 10.0
PENDING, DISPATCHED, RUNNING = TaskState.PENDING, TaskState.DISPATCHED, TaskState.RUNNING
DONE, FAILED, CANCELLED = int(TaskState.DONE), int(TaskState.FAILED), int(TaskState.CANCELLED)


class Harness:
    """A Core with a hand-moved wall clock and helpers that speak for clients and executors."""

    def __init__(self, **config):
        self.wall = WALL0
        self.core = Core(Config(heartbeat_interval_s=1.0, heartbeat_timeout_s=TIMEOUT_S, **config),
                         wall=lambda: self.wall)
        self.batch = 0

    # clients
    def hello(self, peer=b"c1", version=p.PROTOCOL_VERSION):
        self.core.on_client(peer, p.Hello(version, peer.decode(), "test"), 0.0)
        return self.out()

    def submit(self, *specs, peer=b"c1", now=0.0):
        self.batch += 1
        self.core.on_client(peer, p.Submit(self.batch, list(specs)), now)
        return self.out()

    # executors
    def register(self, peer, slots=2, *, version=p.PROTOCOL_VERSION, holding=(), now=0.0):
        msg = p.Register(version, peer.decode(), f"host-{peer.decode()}", ["192.0.2.7", "fe80::7"], 8,
                         16 << 10, "linux-x86_64", slots, 4242, {"instance_id": "i-0abc"}, list(holding))
        self.core.on_executor(peer, msg, now)
        return self.out()

    def report(self, peer, credit=0, started=(), results=(), now=0.0):
        self.core.on_executor(peer, p.Report(credit, list(started), list(results)), now)
        return self.out()

    def dispatch(self, now=0.0):
        self.core.dispatch(now)
        return self.out()

    def out(self):
        out = self.core.take_output()
        return out.to_clients, out.to_executors

    def task_state(self, seq, peer=b"c1"):
        """The state of a live task by the client's seq, from the core's own places."""
        places = list(self.core.plain_tasks()) + [t for ex in self.core.executors.values() for t in ex.tasks.values()]
        found = [t for t in places if t.client.peer == peer and t.seq == seq and t.state in (0, 1, 2)]
        assert len(found) == 1, f"seq {seq} is in {len(found)} places"
        return found[0].state


def spec(seq, kind=p.TaskKind.COMMAND, retries=0, walltime_s=0.0):
    return p.TaskSpec(seq, int(kind), b"body-%d" % seq, retries, walltime_s)


def done(a: p.Assignment, state=DONE, output=b"ok", reason=""):
    return p.ExecResult(a.tid, a.attempt, state, output, reason, WALL0 + 1.0, WALL0 + 2.0)


def assignments(to_executors):
    """{executor peer: [Assignment, ...]} from the Tasks messages sent."""
    got: dict[bytes, list[p.Assignment]] = {}
    for peer, msg in to_executors:
        if type(msg) is p.Tasks:
            got.setdefault(peer, []).extend(msg.tasks)
    return got


def results(to_clients):
    """[(client peer, TaskResult), ...] from the Results messages sent."""
    return [(peer, r) for peer, msg in to_clients if type(msg) is p.Results for r in msg.results]


def kinds(msgs):
    return [(peer, type(m)) for peer, m in msgs]


@pytest.fixture
def h():
    h = Harness()
    h.hello()
    return h


# ------------------------------------------------------------ credit and fair sharing


def test_dispatch_never_sends_more_than_the_credit(h):
    h.register(b"e1")
    h.submit(*[spec(i) for i in range(10)])
    assert h.dispatch() == ([], []), "no credit yet, so no work"
    h.report(b"e1", credit=3)
    first = assignments(h.dispatch()[1])
    assert [a.tid for a in first[b"e1"]] == [1, 2, 3]
    assert all(a.attempt == 1 for a in first[b"e1"])
    assert assignments(h.dispatch()[1]) == {}, "credit spent: nothing more until the executor asks"
    h.report(b"e1", credit=2)
    assert len(assignments(h.dispatch()[1])[b"e1"]) == 2
    assert h.core.status(0.0)["queued"] == 5


def test_dispatch_sends_one_tasks_message_per_executor_capped_by_batch_limit():
    h = Harness(max_dispatch_batch=4)
    h.hello()
    h.register(b"e1")
    h.report(b"e1", credit=10)
    h.submit(*[spec(i) for i in range(10)])
    sent = h.dispatch()[1]
    assert kinds(sent) == [(b"e1", p.Tasks)]
    assert len(sent[0][1].tasks) == 4


def test_credit_left_over_is_used_for_later_work(h):
    h.register(b"e1")
    h.report(b"e1", credit=5)
    h.submit(spec(0), spec(1))
    assert len(assignments(h.dispatch()[1])[b"e1"]) == 2
    h.submit(spec(2), spec(3), spec(4), spec(5))
    assert len(assignments(h.dispatch()[1])[b"e1"]) == 3, "the 3 credits left, no more"


def test_an_executor_that_left_gets_no_work_for_its_unused_credit(h):
    h.register(b"e1")
    h.register(b"e2")
    h.report(b"e1", credit=5)
    h.report(b"e2", credit=5)
    h.core.on_executor(b"e1", p.Bye(), 0.0)
    h.core.tick(TIMEOUT_S + 1.0)  # e2 is lost
    h.out()
    h.submit(spec(0))
    assert h.dispatch() == ([], [])
    assert h.core.status(TIMEOUT_S + 1.0)["queued"] == 1


def test_plenty_of_work_fills_every_executors_credit(h):
    h.register(b"e1")
    h.register(b"e2")
    h.report(b"e1", credit=2)
    h.report(b"e2", credit=3)
    h.submit(*[spec(i) for i in range(10)])
    got = assignments(h.dispatch()[1])
    assert {peer: len(a) for peer, a in got.items()} == {b"e1": 2, b"e2": 3}


def test_one_executor_takes_all_of_the_short_work_at_once(h):
    h.register(b"e1")
    h.report(b"e1", credit=4)
    h.submit(spec(0), spec(1), spec(2))
    assert len(assignments(h.dispatch()[1])[b"e1"]) == 3
    assert h.core.status(0.0)["queued"] == 0


def test_short_work_is_spread_rather_than_all_sent_to_the_first_executor(h):
    h.register(b"e1")
    h.register(b"e2")
    h.report(b"e1", credit=4)
    h.report(b"e2", credit=4)
    h.submit(spec(0), spec(1))
    got = assignments(h.dispatch()[1])
    assert {peer: len(a) for peer, a in got.items()} == {b"e1": 1, b"e2": 1}


def test_short_work_is_shared_in_proportion_to_credit(h):
    h.register(b"e1")
    h.register(b"e2")
    h.report(b"e1", credit=4)
    h.report(b"e2", credit=4)
    h.submit(*[spec(i) for i in range(4)])
    got = assignments(h.dispatch()[1])
    assert h.core.status(0.0)["queued"] == 0, "a task stayed queued although credit was free"
    assert {peer: len(a) for peer, a in got.items()} == {b"e1": 2, b"e2": 2}


# ------------------------------------------------------------ results


def test_results_go_to_the_client_that_submitted_with_executor_and_attempts():
    h = Harness()
    h.hello(b"alice")
    h.hello(b"bob")
    h.wall = WALL0 + 5.0
    h.submit(spec(7), peer=b"alice")
    h.wall = WALL0 + 6.0
    h.submit(spec(7), peer=b"bob")  # seqs are per client: the same number is another task
    h.register(b"e1")
    h.report(b"e1", credit=2)
    sent = assignments(h.dispatch()[1])[b"e1"]
    h.report(b"e1", started=[(a.tid, a.attempt) for a in sent])
    to_clients, _ = h.report(b"e1", results=[done(sent[0], output=b"A"), done(sent[1], FAILED, b"B", "exit 3")])
    got = dict(results(to_clients))
    assert set(got) == {b"alice", b"bob"}
    a, b = got[b"alice"], got[b"bob"]
    assert (a.seq, a.state, a.output, a.reason, a.executor, a.attempts) == (7, DONE, b"A", "", "e1", 1)
    assert (b.seq, b.state, b.output, b.reason, b.executor, b.attempts) == (7, FAILED, b"B", "exit 3", "e1", 1)
    assert (a.submitted, a.started, a.finished) == (WALL0 + 5.0, WALL0 + 1.0, WALL0 + 2.0)
    assert b.submitted == WALL0 + 6.0
    status = h.core.status(0.0)
    assert status["tasks"]["done"] == 1 and status["tasks"]["failed"] == 1
    assert status["tasks"]["running"] == 0


def test_clients_are_told_which_of_their_tasks_started_once_per_turn_before_results(h):
    h.hello(b"alice")
    h.hello(b"bob")
    h.submit(spec(1), spec(2), spec(3), peer=b"alice")
    h.submit(spec(9), peer=b"bob")
    h.register(b"e1", slots=4)
    h.report(b"e1", credit=4)
    by_seq = {int(a.body.split(b"-")[1]): a for a in assignments(h.dispatch()[1])[b"e1"]}  # bodies: body-SEQ
    a1, a2, a3, b9 = (by_seq[seq] for seq in (1, 2, 3, 9))
    to_clients, _ = h.report(b"e1", started=[(a.tid, a.attempt) for a in (a1, a2, b9)], results=[done(a2)])
    kinds = [(peer, type(m)) for peer, m in to_clients]
    assert kinds.index((b"alice", p.Started)) < kinds.index((b"alice", p.Results))
    told = {peer: m.seqs for peer, m in to_clients if type(m) is p.Started}
    assert told == {b"alice": [1], b"bob": [9]}, "a task that finished in the same report is not told started"
    assert h.task_state(1, b"alice") == int(TaskState.RUNNING)
    to_clients, _ = h.report(b"e1", started=[(a1.tid, a1.attempt), (a3.tid, a3.attempt + 1)])
    assert [m for _, m in to_clients if type(m) is p.Started] == [], "a start is told once; a stale one never"


def test_only_the_current_attempt_counts_even_from_the_executor_holding_the_task(h):
    h.submit(spec(0))
    h.register(b"e1")
    h.report(b"e1", credit=1)
    (first,) = assignments(h.dispatch()[1])[b"e1"]
    h.register(b"e1", holding=[])  # reconnected without it: back to the queue
    h.report(b"e1", credit=1)
    (second,) = assignments(h.dispatch()[1])[b"e1"]
    assert (second.tid, second.attempt) == (first.tid, 2)
    h.report(b"e1", started=[(first.tid, 1)])
    assert h.task_state(0) == DISPATCHED, "a start of the old attempt is not a start of this one"
    assert results(h.report(b"e1", results=[done(first, output=b"old")])[0]) == []
    assert h.core.stale_results == 1
    ((_, r),) = results(h.report(b"e1", results=[done(second, output=b"new")])[0])
    assert (r.output, r.attempts) == (b"new", 2)


def test_a_repeated_result_is_stale_and_not_forwarded(h):
    h.submit(spec(0))
    h.register(b"e1")
    h.report(b"e1", credit=1)
    (a,) = assignments(h.dispatch()[1])[b"e1"]
    to_clients, _ = h.report(b"e1", results=[done(a), done(a)])
    assert len(results(to_clients)) == 1
    assert h.core.stale_results == 1
    assert results(h.report(b"e1", results=[done(a)])[0]) == []
    assert h.core.stale_results == 2


# ------------------------------------------------------------ lost executors


def test_silent_executor_is_lost_its_task_requeued_with_next_attempt_late_result_ignored(h):
    h.submit(spec(0, retries=2))
    h.register(b"e1", now=0.0)
    h.register(b"e2", now=0.0)
    h.report(b"e1", credit=1, now=0.0)
    (first,) = assignments(h.dispatch()[1])[b"e1"]
    h.report(b"e1", started=[(first.tid, 1)], now=1.0)
    h.report(b"e2", now=9.0)  # e2 keeps in touch, e1 falls silent after t=1

    h.core.tick(1.0 + TIMEOUT_S)  # exactly the timeout: not yet
    h.out()
    assert set(h.core.executors) == {b"e1", b"e2"}
    h.core.tick(1.0 + TIMEOUT_S + 0.5)
    assert results(h.out()[0]) == []
    assert set(h.core.executors) == {b"e2"}
    assert h.task_state(0) == PENDING
    status = h.core.status(11.5, detail=True)
    assert status["lost_executors"] == 1
    assert status["recent_lost"][0]["id"] == "e1" and status["recent_lost"][0]["tasks"] == 1

    h.report(b"e2", credit=1, now=11.5)
    (second,) = assignments(h.dispatch(11.5)[1])[b"e2"]
    assert (second.tid, second.attempt) == (first.tid, 2)

    # e1 wakes up: unknown now, so told to register; its result is not taken.
    to_clients, to_executors = h.report(b"e1", results=[done(first, output=b"late")], now=12.0)
    assert results(to_clients) == [] and kinds(to_executors) == [(b"e1", p.Reregister)]
    # Registered again, its result for the old attempt is stale.
    h.register(b"e1", now=12.0)
    to_clients, _ = h.report(b"e1", results=[done(first, output=b"late")], now=12.0)
    assert results(to_clients) == []
    assert h.core.stale_results == 1
    assert h.task_state(0) == DISPATCHED

    to_clients, _ = h.report(b"e2", results=[done(second, output=b"fresh")], now=13.0)
    ((peer, r),) = results(to_clients)
    assert (peer, r.state, r.output, r.executor, r.attempts) == (b"c1", DONE, b"fresh", "e2", 2)


def test_after_a_stall_of_its_own_loop_the_dispatcher_gives_every_executor_a_full_timeout(h):
    h.register(b"e1", now=0.0)
    h.register(b"e2", now=0.0)
    h.report(b"e2", now=4.0)
    h.core.stalled(30.0, 29.0)  # the loop slept through the executors' messages (SIGSTOP)
    h.core.tick(30.0)
    h.core.tick(30.0 + TIMEOUT_S)  # exactly a timeout after the stall: not yet
    assert set(h.core.executors) == {b"e1", b"e2"}
    h.report(b"e2", now=31.0)  # e2's queued messages are read; e1 stays silent
    h.core.tick(30.0 + TIMEOUT_S + 0.5)
    assert set(h.core.executors) == {b"e2"}  # silent for a whole timeout since the stall


def test_lost_past_the_retry_limit_fails_with_lost_in_the_reason(h):
    h.submit(spec(0, retries=1))
    now = 0.0
    for attempt in (1, 2):
        peer = b"e%d" % attempt
        h.register(peer, now=now)
        h.report(peer, credit=1, now=now)
        (a,) = assignments(h.dispatch(now)[1])[peer]
        assert a.attempt == attempt
        now += TIMEOUT_S + 1.0
        h.core.tick(now)
        got = results(h.out()[0])
        if attempt == 1:
            assert got == [], "one retry was allowed"
    ((peer, r),) = got
    assert r.state == FAILED and r.executor == "" and r.attempts == 2
    assert "lost" in r.reason and "retry limit of 1" in r.reason, r.reason
    assert h.core.status(now)["tasks"]["failed"] == 1


def test_no_retries_means_the_first_loss_fails_the_task(h):
    h.submit(spec(0, retries=0))
    h.register(b"e1")
    h.report(b"e1", credit=1)
    h.dispatch()
    h.core.tick(TIMEOUT_S + 1.0)
    ((_, r),) = results(h.out()[0])
    assert r.state == FAILED and "e1" in r.reason and "lost" in r.reason


def test_tick_heartbeats_quiet_executors(h):
    # every max(interval, timeout / 3): an executor hears from us thrice per timeout
    every = max(1.0, TIMEOUT_S / 3)
    h.register(b"e1", now=0.0)
    h.core.tick(every * 0.9)
    assert h.out() == ([], [])
    h.core.tick(every)
    assert kinds(h.out()[1]) == [(b"e1", p.Heartbeat)]


# ------------------------------------------------------------ refusals and bad input


def test_unknown_task_kind_fails_at_once_with_a_clear_reason(h):
    h.register(b"e1")
    h.report(b"e1", credit=5)
    to_clients, _ = h.submit(spec(0, kind=7), spec(1))
    assert (b"c1", p.Accepted(h.batch, 2)) in to_clients, "the whole batch is acknowledged"
    ((peer, r),) = results(to_clients)
    assert (r.seq, r.state, r.executor, r.attempts) == (0, FAILED, "", 0)
    assert "unknown task kind 7" in r.reason
    assert "command (1)" in r.reason and "python (2)" in r.reason, "says what is accepted"
    got = assignments(h.dispatch()[1])
    assert [a.kind for a in got[b"e1"]] == [1], "the invalid task is never dispatched"


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (spec(0, retries=-1), "retries"),
        (spec(0, walltime_s=-1.0), "walltime"),
        (spec(0, walltime_s=float("nan")), "walltime"),
    ],
)
def test_invalid_specs_fail_at_once(h, bad, words):
    ((_, r),) = results(h.submit(bad)[0])
    assert r.state == FAILED and words in r.reason
    assert h.core.status(0.0)["queued"] == 0


def test_client_with_another_protocol_version_is_refused_naming_both_versions():
    h = Harness()
    to_clients, _ = h.hello(b"old", version=p.PROTOCOL_VERSION + 1)
    ((peer, msg),) = to_clients
    assert peer == b"old" and type(msg) is p.Refused
    assert str(p.PROTOCOL_VERSION + 1) in msg.reason and str(p.PROTOCOL_VERSION) in msg.reason
    to_clients, _ = h.submit(spec(0), peer=b"old")
    assert kinds(to_clients) == [(b"old", p.HelloAgain)], "still unknown: it must say Hello first"
    assert "Hello" in to_clients[0][1].reason
    assert h.core.submitted_total == 0


def test_executor_with_another_protocol_version_is_refused_naming_both_versions():
    h = Harness()
    _, to_executors = h.register(b"e1", version=99)
    ((peer, msg),) = to_executors
    assert peer == b"e1" and type(msg) is p.Refused
    assert "99" in msg.reason and str(p.PROTOCOL_VERSION) in msg.reason
    assert h.core.executors == {}


def test_executor_without_slots_is_refused():
    h = Harness()
    ((_, msg),) = h.register(b"e1", slots=0)[1]
    assert type(msg) is p.Refused and "slot" in msg.reason
    assert h.core.executors == {}


@pytest.mark.parametrize("msg", [p.Heartbeat(), p.Report(3, [], []), p.Drain([(1, 1)])])
def test_message_from_an_unknown_executor_gets_reregister(msg):
    h = Harness()
    h.core.on_executor(b"ghost", msg, 0.0)
    to_clients, to_executors = h.out()
    assert to_clients == []
    assert kinds(to_executors) == [(b"ghost", p.Reregister)]
    assert h.core.executors == {}


def _register_msg(peer: bytes) -> p.Register:
    return p.Register(p.PROTOCOL_VERSION, peer.decode(), "h", [], 1, 1024, "linux", 1, 1, {}, [])


@pytest.mark.parametrize("msg", [_register_msg(b"ex"), p.Heartbeat(), p.Report(1, [], [])])
def test_an_executor_on_the_client_port_is_told_the_executor_port(msg):
    h = Harness()
    h.core.endpoints = {"client": "tcp://127.0.0.1:5555", "executor": "tcp://127.0.0.1:5556"}
    h.core.on_client(b"ex", msg, 0.0)
    to_clients, to_executors = h.out()
    ((peer, refused),) = to_clients
    assert peer == b"ex" and type(refused) is p.Refused and to_executors == []
    assert refused.reason == p.wrong_port("client", "5556")
    assert p.refusal_text(refused.reason, "tcp://h:5555") == (
        "tcp://h:5555 is the dispatcher's client port; executors connect to its executor port, 5556 "
        "(the 'executor:' line falconet dispatcher prints)")
    assert h.core.clients == {} and h.core.executors == {}


@pytest.mark.parametrize("msg", [p.Hello(p.PROTOCOL_VERSION, "c", "n"), p.StatusRequest(1, False),
                                 p.Submit(1, [])])
def test_a_client_on_the_executor_port_is_told_the_client_port(msg):
    h = Harness()
    h.core.endpoints = {"client": "tcp://127.0.0.1:5555", "executor": "tcp://127.0.0.1:5556"}
    h.core.on_executor(b"c", msg, 0.0)
    to_clients, to_executors = h.out()
    ((peer, refused),) = to_executors
    assert peer == b"c" and type(refused) is p.Refused and to_clients == []
    assert p.refusal_text(refused.reason, "tcp://h:5556") == (
        "tcp://h:5556 is the dispatcher's executor port; clients connect to its client port, 5555 "
        "(the 'client:' line falconet dispatcher prints)")
    assert h.core.clients == {} and h.core.executors == {} and h.core.submitted_total == 0


def test_a_wrong_port_refusal_without_known_endpoints_leaves_the_number_out():
    h = Harness()
    h.core.on_executor(b"c", p.Hello(p.PROTOCOL_VERSION, "c", "n"), 0.0)
    ((_, refused),) = h.out()[1]
    assert refused.reason.startswith(p.WRONG_PORT) and "client port (the 'client:' line" in refused.reason
    assert p.refusal_text("say Hello first: x", "tcp://h:1") == "say Hello first: x"


def test_bye_from_an_unknown_executor_is_ignored():
    h = Harness()
    h.core.on_executor(b"ghost", p.Bye(), 0.0)
    assert h.out() == ([], [])


def test_cancelled_result_for_a_started_task_does_not_lose_the_task(h):
    h.submit(spec(0))
    h.register(b"e1")
    h.report(b"e1", credit=1)
    (a,) = assignments(h.dispatch()[1])[b"e1"]
    to_clients, _ = h.report(b"e1", started=[(a.tid, a.attempt)], results=[done(a, CANCELLED, b"", "x")])
    # Whatever the core makes of it, the task must end with one result or stay held.
    answered = len(results(to_clients)) == 1
    held = a.tid in h.core.executors[b"e1"].tasks
    assert answered != held


# ------------------------------------------------------------ drain, cancel, unreachable


def test_drain_returns_tasks_to_the_front_without_spending_retries(h):
    h.submit(spec(0, retries=1), spec(1), spec(2))
    h.register(b"e1")
    h.report(b"e1", credit=2)
    first, running = assignments(h.dispatch()[1])[b"e1"]  # seqs 0 and 1
    h.report(b"e1", started=[(running.tid, 1)])
    # Hands back seq 0 (never started); a pair with the wrong attempt is ignored.
    h.core.on_executor(b"e1", p.Drain([(first.tid, 1), (running.tid, 9)]), 0.0)
    assert h.out() == ([], [])
    assert h.task_state(0) == PENDING and h.task_state(1) == RUNNING
    # A draining executor gets no more work, whatever credit it offers.
    h.report(b"e1", credit=5)
    assert assignments(h.dispatch()[1]) == {}
    assert h.core.status(0.0, detail=True)["executor_table"][0]["state"] == "draining"
    # It still finishes what it runs, then leaves.
    assert [r.seq for _, r in results(h.report(b"e1", results=[done(running)])[0])] == [1]
    h.core.on_executor(b"e1", p.Bye(), 0.0)

    h.register(b"e2")
    h.report(b"e2", credit=1)
    (again,) = assignments(h.dispatch()[1])[b"e2"]
    assert (again.tid, again.attempt) == (first.tid, 2), "the returned task goes first, as a new attempt"
    # One loss is within its single retry: the drain did not spend it.
    h.core.tick(TIMEOUT_S + 1.0)
    assert results(h.out()[0]) == []
    assert h.task_state(0) == PENDING
    assert h.core.lost_total == 1


def test_cancel_finishes_queued_tasks_and_asks_executors_to_drop_unstarted_ones(h):
    h.submit(*[spec(i) for i in range(5)])
    h.register(b"e1")
    h.report(b"e1", credit=2)
    sent = assignments(h.dispatch()[1])[b"e1"]  # seqs 0 and 1
    h.report(b"e1", started=[(sent[1].tid, 1)])  # seq 1 runs
    h.wall = WALL0 + 3.0
    h.core.on_client(b"c1", p.Cancel([0, 1, 2, 4, 99]), 0.0)
    to_clients, to_executors = h.out()
    cancelled = {r.seq: r for _, r in results(to_clients)}
    assert set(cancelled) == {2, 4}, "only queued tasks are cancelled at once"
    for r in cancelled.values():
        assert (r.state, r.executor, r.attempts, r.finished) == (CANCELLED, "", 0, WALL0 + 3.0)
    assert to_executors == [(b"e1", p.CancelTasks([sent[0].tid]))], "the unstarted one is asked back"
    # Cancelling again what is already cancelled changes nothing.
    h.core.on_client(b"c1", p.Cancel([2, 4]), 0.0)
    assert h.out() == ([], [])
    # The executor dropped it: its CANCELLED result ends it.
    to_clients, _ = h.report(b"e1", results=[done(sent[0], CANCELLED, b"", "cancelled before it started")])
    ((_, r),) = results(to_clients)
    assert (r.seq, r.state, r.executor) == (0, CANCELLED, "e1")
    h.report(b"e1", credit=5)
    (left,) = assignments(h.dispatch()[1])[b"e1"]
    assert left.body == b"body-3", "cancelled tasks are skipped by dispatch"
    assert h.core.status(0.0)["tasks"]["cancelled"] == 3


def test_unreachable_executor_requeues_undelivered_tasks_without_counting_an_attempt(h):
    h.submit(spec(0, retries=0), spec(1, retries=0), spec(2, retries=0))
    h.register(b"e1")
    h.report(b"e1", credit=1)
    (held,) = assignments(h.dispatch()[1])[b"e1"]  # delivered: e1 really has seq 0
    h.report(b"e1", credit=2)
    h.core.dispatch(0.0)
    _, to_executors = h.out()
    ((peer, tasks_msg),) = to_executors
    assert [a.attempt for a in tasks_msg.tasks] == [1, 1]

    h.core.executor_unreachable(b"e1", tasks_msg)
    to_clients, _ = h.out()
    assert h.core.executors == {} and h.core.lost_total == 1
    # The delivered task was lost with its executor (no retries left); the others never left.
    ((_, r),) = results(to_clients)
    assert (r.seq, r.state) == (0, FAILED) and "lost" in r.reason
    assert h.task_state(1) == PENDING and h.task_state(2) == PENDING

    h.register(b"e2")
    h.report(b"e2", credit=5)
    again = assignments(h.dispatch()[1])[b"e2"]
    assert sorted((a.body, a.attempt) for a in again) == [(b"body-1", 1), (b"body-2", 1)]
    assert held.body == b"body-0"


def test_unreachable_for_a_non_tasks_message_loses_the_executor(h):
    h.submit(spec(0, retries=1))
    h.register(b"e1")
    h.report(b"e1", credit=1)
    h.dispatch()
    h.core.executor_unreachable(b"e1", p.Heartbeat())
    assert h.out() == ([], [])
    assert h.core.executors == {} and h.task_state(0) == PENDING
    h.core.executor_unreachable(b"e1", p.Heartbeat())  # already gone: nothing happens


def test_reconnect_keeps_held_tasks_and_requeues_the_rest_without_a_loss(h):
    h.submit(spec(0, retries=0), spec(1, retries=0))
    h.register(b"e1")
    h.report(b"e1", credit=2)
    a, b = assignments(h.dispatch()[1])[b"e1"]
    _, to_executors = h.register(b"e1", holding=[(a.tid, a.attempt)])
    assert kinds(to_executors) == [(b"e1", p.Registered)]
    assert h.task_state(0) == DISPATCHED and h.task_state(1) == PENDING
    assert h.core.executors[b"e1"].credit == 0, "a reconnect starts with no credit"
    assert h.core.lost_total == 0
    to_clients, _ = h.report(b"e1", results=[done(a)])
    assert [r.state for _, r in results(to_clients)] == [DONE]


# ------------------------------------------------------------ size limits


def test_a_task_over_the_size_limit_fails_alone_with_the_reason():
    h = Harness(max_task_bytes=100)
    h.hello()
    to_clients, _ = h.submit(p.TaskSpec(1, 1, b"x" * 101, 0, 0.0), p.TaskSpec(2, 1, b"x" * 100, 0, 0.0))
    [(_, r)] = results(to_clients)
    assert r.seq == 1 and r.state == FAILED and "101 bytes" in r.reason and "--max-task-bytes" in r.reason
    assert (b"c1", p.Accepted(1, 2)) in to_clients
    assert h.task_state(2) == PENDING


def test_an_output_over_the_limit_fails_that_task_only():
    h = Harness(max_output_bytes=10)
    h.hello()
    h.register(b"e1")
    h.submit(spec(1), spec(2))
    h.report(b"e1", credit=2)
    [a1, a2] = assignments(h.dispatch()[1])[b"e1"]
    to_clients, _ = h.report(b"e1", results=[done(a1, output=b"y" * 11), done(a2, output=b"y" * 10)])
    got = {r.seq: r for _, r in results(to_clients)}
    assert got[1].state == FAILED and "--max-output-bytes" in got[1].reason and got[1].output == b""
    assert got[2].state == DONE and got[2].output == b"y" * 10


def _register_ending(h: Harness, peer: bytes, ends_at: float, slots: int = 4) -> None:
    msg = p.Register(p.PROTOCOL_VERSION, peer.decode(), "node1", [], 8, 16 << 10, "linux-x86_64", slots, 4242,
                     {"ends_at": ends_at}, [])
    h.core.on_executor(peer, msg, 0.0)
    h.out()


def test_a_task_that_would_outlast_an_executors_allocation_is_not_given_to_it():
    """An executor of a batch job says when it stops taking work (facts' ends_at): tasks
    whose walltime is longer than what is left wait, in order, for one with more time;
    tasks with no walltime, or one that fits, go."""
    h = Harness()
    h.hello()
    h.submit(spec(1, walltime_s=30.0), spec(2, walltime_s=300.0), spec(3), spec(4, walltime_s=60.0),
             spec(5, walltime_s=600.0))
    _register_ending(h, b"short", WALL0 + 100.0)
    h.report(b"short", credit=4)
    got = assignments(h.dispatch()[1])
    assert [a.walltime_s for a in got[b"short"]] == [30.0, 0.0, 60.0]
    h.register(b"long", slots=4)  # no end: takes the rest, in their order
    h.report(b"long", credit=4)
    assert [a.walltime_s for a in assignments(h.dispatch()[1])[b"long"]] == [300.0, 600.0]


def test_an_allocation_that_has_run_out_takes_only_tasks_without_walltime():
    h = Harness()
    h.hello()
    _register_ending(h, b"late", WALL0 + 5.0)
    h.wall += 10.0  # past its end (it is about to leave)
    h.submit(spec(1, walltime_s=1.0), spec(2))
    h.report(b"late", credit=2)
    assert [a.walltime_s for a in assignments(h.dispatch()[1])[b"late"]] == [0.0]
    assert h.task_state(1) == PENDING
