"""Sharing between clients in the core: fair shares of free slots, back-pressure on clients
that do not read their results, and the work and results of clients that are gone."""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import protocol as p
from falconet.dispatcher.core import Config, Core
from falconet.protocol import TaskState

WALL0 = 1_700_000_000.0
DONE, CANCELLED, PENDING = int(TaskState.DONE), int(TaskState.CANCELLED), int(TaskState.PENDING)


class Harness:
    def __init__(self, **config):
        self.core = Core(Config(**config), wall=lambda: WALL0)
        self.batches: collections.Counter = collections.Counter()

    def hello(self, peer: bytes, now: float = 0.0) -> None:
        self.core.on_client(peer, p.Hello(p.PROTOCOL_VERSION, peer.decode(), peer.decode()), now)

    def submit(self, peer: bytes, seqs, body: bytes = b"", now: float = 0.0) -> None:
        self.batches[peer] += 1
        specs = [p.TaskSpec(s, int(p.TaskKind.COMMAND), body or b"%s-%d" % (peer, s), 0, 0.0) for s in seqs]
        self.core.on_client(peer, p.Submit(self.batches[peer], specs), now)

    def register(self, peer: bytes, slots: int, now: float = 0.0) -> None:
        self.core.on_executor(peer, p.Register(p.PROTOCOL_VERSION, peer.decode(), "h", [], slots, 1024, "linux",
                                               slots, 1, {}, []), now)

    def credit(self, ex: bytes, n: int, results=(), now: float = 0.0) -> list[p.Assignment]:
        """Report results and n credit; dispatch; the tasks the executor got."""
        self.core.on_executor(ex, p.Report(n, [], list(results)), now)
        self.core.dispatch(now)
        out = self.core.take_output()
        self.last = out
        return [a for peer, m in out.to_executors if peer == ex and type(m) is p.Tasks for a in m.tasks]


def owner(a: p.Assignment) -> bytes:
    return a.body.split(b"-")[0]


def ran(a: p.Assignment, output: bytes = b"") -> p.ExecResult:
    return p.ExecResult(a.tid, a.attempt, DONE, output, "", WALL0, WALL0 + 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.integers(1, 16), st.integers(4, 40))
def test_free_slots_go_round_the_clients_in_proportion_to_their_weights(weights, credit, rounds):
    names = [b"c%d" % i for i in range(len(weights))]
    h = Harness(client_weights=tuple((n.decode(), float(w)) for n, w in zip(names, weights)))
    for name in names:
        h.hello(name)
        h.submit(name, range(10_000))  # everyone has far more than will run
    h.register(b"e", credit)
    got: collections.Counter = collections.Counter()
    results: list = []
    for _ in range(rounds):
        batch = h.credit(b"e", credit, results)
        got.update(owner(a) for a in batch)
        results = [ran(a) for a in batch]
    total, wsum = sum(got.values()), sum(weights)
    assert total == credit * rounds
    for name, w in zip(names, weights):
        # each client's share of what ran is its weight's share, give or take one round's worth
        assert abs(got[name] - total * w / wsum) <= credit + len(names), (got, weights)


def test_one_clients_flood_does_not_hold_back_anothers_few_tasks():
    h = Harness()
    h.hello(b"flood")
    h.hello(b"few")
    h.submit(b"flood", range(200_000))
    h.submit(b"few", range(20))
    h.register(b"e", 4)
    seen: list[bytes] = []
    results: list = []
    while seen.count(b"few") < 20:
        batch = h.credit(b"e", 4, results)
        seen += [owner(a) for a in batch]
        results = [ran(a) for a in batch]
    assert len(seen) <= 44  # its 20 went in the first rounds, beside as many of the flood's


def test_a_client_that_does_not_read_its_results_waits_until_it_does():
    h = Harness(max_unacked_bytes=10_000)
    h.hello(b"slow")
    h.hello(b"other")
    h.submit(b"slow", range(100))
    h.register(b"e", 4)
    batch, sent = h.credit(b"e", 4), []
    for _ in range(10):  # each result carries 1 KB of output; slow never acknowledges
        batch = h.credit(b"e", 4, [ran(a, b"x" * 1000) for a in batch])
        sent += [a for a in batch]
    held = h.core.clients[b"slow"]
    assert held.held and held.unacked_bytes > 10_000
    assert batch == []  # its tasks wait, the executor has credit
    h.submit(b"other", range(3))
    assert {owner(a) for a in h.credit(b"e", 0)} == {b"other"}  # others are not held back
    h.core.on_client(b"slow", p.Ack(sorted(held.unacked)), 1.0)
    assert not held.held and held.unacked_bytes == 0
    assert {owner(a) for a in h.credit(b"e", 4)} == {b"slow"}


def test_a_silent_clients_queued_work_is_cancelled_and_its_results_expire():
    h = Harness(client_timeout_s=30.0, result_expiry_s=100.0)
    h.hello(b"gone")
    h.hello(b"here")
    h.submit(b"gone", range(50))
    h.register(b"e", 2)
    batch = h.credit(b"e", 2)
    h.credit(b"e", 0, [ran(a) for a in batch])  # two ran; their results are never acknowledged
    h.core.on_client(b"here", p.Ack([]), 29.0)
    h.core.tick(29.0)
    assert h.core.counts[PENDING] == 48  # silent for 29 s: still its work
    h.core.on_client(b"here", p.Ack([]), 40.0)
    h.core.tick(31.0)
    h.core.take_output()
    gone = h.core.clients[b"gone"]
    assert gone.counts[PENDING] == 0 and gone.counts[CANCELLED] == 48
    assert "silent for 31s (--client-timeout 30)" in gone.unacked[2].reason
    h.core.tick(101.0)
    assert b"gone" not in h.core.clients  # results dropped, nothing of it live: forgotten
    assert b"here" in h.core.clients


def test_a_client_that_comes_back_in_time_keeps_its_work():
    h = Harness(client_timeout_s=30.0)
    h.hello(b"c")
    h.submit(b"c", range(5))
    h.hello(b"c", now=25.0)  # its ping
    h.core.tick(50.0)
    assert h.core.counts[PENDING] == 5
