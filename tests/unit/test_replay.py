"""Journal replay and snapshot (dispatcher/replay.py), on their own and through the core.

Records go through msgpack as the journal gives them back; no files, no sockets.
"""

from __future__ import annotations

import logging

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import needs as nd
from falconet import protocol as p
from falconet.dispatcher import replay
from falconet.dispatcher.core import ClientEntry, Config, Core
from falconet.dispatcher.records import Kind

WALL0 = 1_700_000_000.0


class Farm:
    """A journaling core, one client and one executor, driven by hand."""

    def __init__(self):
        self.core = Core(Config(heartbeat_timeout_s=10.0), wall=lambda: WALL0, journal_id="j1")
        self.records: list = []
        self.batch = 0
        self.seq = 0
        self.core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
        self.core.on_executor(b"e1", p.Register(p.PROTOCOL_VERSION, "e1", "h", [], 1, 1, "x", 4, 1, {}, []), 0.0)
        self.flush()

    def flush(self):
        out = self.core.take_output()
        self.records += out.journal
        return out.to_clients, out.to_executors

    def submit(self, n):
        specs = [p.TaskSpec(self.seq + i + 1, 1, b"body-%d" % (self.seq + i + 1), 3, 0.0) for i in range(n)]
        self.seq += n
        self.batch += 1
        self.core.on_client(b"c1", p.Submit(self.batch, specs), 0.0)
        return self.flush()

    def take(self, credit):
        self.core.on_executor(b"e1", p.Report(credit, [], []), 0.0)
        self.core.dispatch(0.0)
        _, to_ex = self.flush()
        return [a for _, m in to_ex if type(m) is p.Tasks for a in m.tasks]

    def finish(self, assignments):
        results = [p.ExecResult(a.tid, a.attempt, int(p.TaskState.DONE), b"out", "", 1.0, 2.0) for a in assignments]
        self.core.on_executor(b"e1", p.Report(0, [], results), 0.0)
        return self.flush()

    def ack(self, seqs):
        self.core.on_client(b"c1", p.Ack(list(seqs)), 0.0)
        self.flush()


def restored(records) -> Core:
    core = Core(Config(), wall=lambda: WALL0, journal_id="j1")
    core.restore(list(_wire(records)))
    return core


def _wire(records):
    """Records as replay gives them: through msgpack, so tuples come back as lists."""
    for kind, fields in records:
        yield kind, msgpack.unpackb(msgpack.packb(list(fields), use_bin_type=True))


def live(core: Core) -> tuple[list[int], list[int]]:
    """(seqs still to run in queue order, seqs with a result kept for the client)."""
    todo = [t.seq for ex in core.executors.values() for t in ex.tasks.values() if t.state in (0, 1, 2)]
    todo += [t.seq for t in core.plain_tasks() if t.state == 0]
    kept = sorted(seq for c in core.clients.values() for seq in c.unacked)
    return todo, kept


def test_restore_queues_the_unfinished_and_keeps_the_unacknowledged():
    farm = Farm()
    farm.submit(5)
    running = farm.take(3)
    farm.finish(running[:2])
    farm.ack([1])  # the first one dispatched
    core = restored(farm.records)
    assert live(core) == ([3, 4, 5], [2])
    assert core.counts[int(p.TaskState.PENDING)] == 3 and core.counts[int(p.TaskState.DONE)] == 1


def test_a_restored_client_must_say_hello_and_then_gets_its_results_again():
    farm = Farm()
    farm.submit(2)
    farm.finish(farm.take(2))
    core = restored(farm.records)
    core.on_client(b"c1", p.StatusRequest(1, False), 0.0)
    [(_, answer)] = core.take_output().to_clients
    assert type(answer) is p.HelloAgain
    core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
    out = [m for _, m in core.take_output().to_clients]
    assert type(out[0]) is p.Welcome and out[0].limits["journal"] is True
    assert sorted(r.seq for m in out[1:] for r in m.results) == [1, 2]


def test_a_batch_sent_again_after_a_restart_is_not_queued_twice():
    farm = Farm()
    farm.submit(3)
    core = restored(farm.records)
    core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
    core.on_client(b"c1", p.Submit(1, [p.TaskSpec(i, 1, b"", 3, 0.0) for i in (1, 2, 3)]), 0.0)
    out = [m for _, m in core.take_output().to_clients]
    assert p.Accepted(1, 3) in out
    assert live(core) == ([1, 2, 3], [])


def test_losses_survive_a_restart_so_the_retry_limit_holds():
    farm = Farm()
    farm.submit(1)
    farm.take(1)
    farm.core.tick(100.0)  # the executor is lost: one loss
    farm.flush()
    core = restored(farm.records)
    assert [t.losses for t in core.plain_tasks()] == [1]


EVENTS = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 5)),
    st.tuples(st.just("take"), st.integers(1, 4)),
    st.tuples(st.just("finish"), st.integers(0, 4)),
    st.tuples(st.just("ack"), st.integers(0, 4)),
    st.tuples(st.just("cancel"), st.integers(1, 20)),
    st.tuples(st.just("compact"), st.just(0)),
), max_size=30)


@given(EVENTS)
@settings(max_examples=200, deadline=None)
def test_replay_and_compaction_keep_exactly_the_live_state(events):
    """Whatever happened, a restore from the journal (compacted or not) holds what is live."""
    farm = Farm()
    held: list = []
    compacted: list | None = None
    for what, n in events:
        if what == "submit":
            farm.submit(n)
        elif what == "take":
            held += farm.take(n)
        elif what == "finish":
            done, held = held[:n], held[n:]
            farm.finish(done)
        elif what == "ack":
            kept = sorted(s for c in farm.core.clients.values() for s in c.unacked)
            farm.ack(kept[:n])
        elif what == "cancel":
            farm.core.on_client(b"c1", p.Cancel([n]), 0.0)
            farm.flush()
        else:
            compacted = list(farm.core.snapshot())
            farm.records = list(compacted)
    todo, kept = live(farm.core)
    after = restored(farm.records)
    assert sorted(live(after)[0]) == sorted(todo)
    assert live(after)[1] == kept
    assert live(restored(list(farm.core.snapshot()))) == live(after)


@given(st.lists(st.integers(-5, 40), max_size=60))
def test_each_batch_number_is_accepted_once_in_any_order(batches):
    client = ClientEntry(b"c", "n")
    firsts = [b for b in batches if client.first_time(b)]
    assert sorted(firsts) == sorted(set(batches))
    assert all(not client.first_time(b) for b in batches)


# ---------------------------------------------------------------- the module on its own


def _spec(seq, needs=b""):
    return list(p.TaskSpec(seq, 1, b"x", 2, 0.0, needs))


def test_replay_returns_the_live_tasks_in_order_and_makes_unwelcomed_sessions():
    clients: dict = {}
    records = [(Kind.SUBMIT, [b"c", "alice", 1, 5.0, [_spec(1), _spec(2, nd.encode(nd.make(cpus=2)))]]),
               (Kind.SUBMIT, [b"d", "bob", 1, 6.0, [_spec(1)]]),
               (Kind.RESULTS, [b"c", [list(p.TaskResult(1, 3, b"", "", "e", 1, 5.0, 0.0, 0.0))]]),
               (Kind.LOSSES, [b"c", [[2, 1]]])]
    live = replay.replay(_wire(records), clients)
    assert [(t.client.name, t.seq, t.losses, t.needs) for t in live] == [
        ("alice", 2, 1, nd.make(cpus=2)), ("bob", 1, 0, None)]
    assert not clients[b"c"].welcomed and list(clients[b"c"].unacked) == [1]
    assert clients[b"c"].batch_high == 1 and live[0].submitted == 5.0


def test_an_ack_forgets_results_and_a_client_record_keeps_the_batches_seen():
    clients: dict = {}
    records = [(Kind.RESULTS, [b"c", [list(p.TaskResult(s, 3, b"", "", "e", 1, 0.0, 0.0, 0.0)) for s in (1, 2)]]),
               (Kind.ACK, [b"c", [1, 9]]), (Kind.CLIENT, [b"c", "carol", 3, [2, 5]])]
    assert replay.replay(_wire(records), clients) == []
    c = clients[b"c"]
    assert (c.name, list(c.unacked), c.batch_high, c.batch_extra) == ("carol", [2], 3, {5})


def test_a_record_of_unknown_kind_is_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, "falconet.dispatcher"):
        assert replay.replay([(99, [b"c"])], {}) == []
    assert "unknown kind 99" in caplog.text


def test_restored_needs_are_none_for_plain_and_for_garbage():
    assert replay.restored_needs(b"") is None
    assert replay.restored_needs(b"\xc1") is None
    assert replay.restored_needs(nd.encode(nd.make(cpus=3))) == nd.make(cpus=3)


def test_snapshot_lists_dispatched_tasks_before_queued_ones_and_splits_with_chunks():
    farm = Farm()
    farm.submit(4)
    farm.take(1)
    core = farm.core
    queues = [list(core.plain_tasks())]
    runs = list(replay.snapshot(core.clients.values(), core.executors.values(), queues, lambda r, _f: [r[:2], r[2:]]))
    assert [k for k, _ in runs] == [Kind.CLIENT, Kind.TASKS, Kind.TASKS, Kind.RESULTS, Kind.RESULTS]
    assert [t[0] for _, (_, part) in runs[1:3] for t in part] == [1, 2, 3, 4]
