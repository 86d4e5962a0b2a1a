"""The journal file (framing, torn tails, versions, lock) and the core's restore and snapshot."""

from __future__ import annotations

import logging
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from falconet import protocol as p
from falconet.dispatcher import journal as j
from falconet.dispatcher.core import Config, Core
from falconet.errors import JournalError

WALL0 = 1_700_000_000.0
RECORDS = st.lists(st.tuples(st.sampled_from(list(j.Kind)),
                             st.lists(st.one_of(st.integers(-2**40, 2**40), st.binary(max_size=64),
                                                st.text(max_size=16)), max_size=4)),
                   min_size=1, max_size=12)


def write(path, records):
    jr = j.Journal(path)
    list(jr.replay())
    for kind, fields in records:
        jr.append(kind, *fields)
    jr.commit()
    jr.close()


def read(path):
    jr = j.Journal(path)
    got = [(kind, fields) for kind, fields in jr.replay()]
    return jr, got


def test_records_survive_a_reopen_in_order(tmp_path):
    records = [(j.Kind.SUBMIT, [b"c1", "n", 1, 2.5, [[1, 1, b"x", 3, 0.0]]]), (j.Kind.ACK, [b"c1", [1, 2]])]
    write(tmp_path, records)
    jr, got = read(tmp_path)
    jr.close()
    assert got == [(int(k), f) for k, f in records]


@given(RECORDS, st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_torn_tail_is_cut_at_the_last_whole_record(tmp_path_factory, records, data):
    path = tmp_path_factory.mktemp("j")
    write(path, records)
    whole = (path / "journal").read_bytes()
    cut = data.draw(st.integers(j._HEADER.size, len(whole) - 1), label="cut")
    (path / "journal").write_bytes(whole[:cut])
    jr, got = read(path)
    assert got == [(int(k), f) for k, f in records[:len(got)]]  # a prefix, in order
    assert len(got) < len(records)
    if cut == jr.size:  # cut at a record boundary: nothing torn, nothing to report
        assert jr.recovered_from == ""
    else:
        assert "incomplete or corrupt" in jr.recovered_from
    # appending after the recovery gives a journal that replays whole
    jr.append(j.Kind.ACK, b"c", [7])
    jr.commit()
    jr.close()
    _, again = read(path)
    assert again == [*got, (int(j.Kind.ACK), [b"c", [7]])]


def test_a_flipped_byte_in_the_last_record_is_detected(tmp_path, caplog):
    write(tmp_path, [(j.Kind.ACK, [b"c", [1]]), (j.Kind.ACK, [b"c", [2]])])
    raw = bytearray((tmp_path / "journal").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "journal").write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="falconet.dispatcher"):
        jr, got = read(tmp_path)
    jr.close()
    assert got == [(int(j.Kind.ACK), [b"c", [1]])]
    assert "crash mid-write" in caplog.text and "recovered everything before it" in caplog.text


def test_another_format_version_is_refused_naming_both(tmp_path):
    (tmp_path / "journal").write_bytes(struct.pack("<16sI", j.MAGIC, j.FORMAT_VERSION + 1))
    with pytest.raises(JournalError, match=f"format {j.FORMAT_VERSION + 1}.*reads format {j.FORMAT_VERSION}"):
        list(j.Journal(tmp_path).replay())


def test_a_foreign_file_is_refused(tmp_path):
    (tmp_path / "journal").write_bytes(b"hello, this is not a journal at all")
    with pytest.raises(JournalError, match="not a falconet journal"):
        list(j.Journal(tmp_path).replay())


def test_a_second_dispatcher_is_kept_out_of_the_directory(tmp_path):
    first = j.Journal(tmp_path)
    try:
        with pytest.raises(JournalError, match="another dispatcher .* uses state directory"):
            j.Journal(tmp_path)
    finally:
        first.close()
    j.Journal(tmp_path).close()  # free again


def test_rewrite_replaces_the_journal_with_the_records_given(tmp_path):
    jr = j.Journal(tmp_path)
    list(jr.replay())
    for i in range(100):
        jr.append(j.Kind.ACK, b"c", [i])
    jr.commit()
    big = jr.size
    jr.rewrite([(j.Kind.ACK, (b"c", [99]))])
    assert jr.size < big
    jr.append(j.Kind.ACK, b"c", [100])
    jr.close()
    _, got = read(tmp_path)
    assert got == [(int(j.Kind.ACK), [b"c", [99]]), (int(j.Kind.ACK), [b"c", [100]])]
    assert not (tmp_path / "journal.new").exists()


# ---------------------------------------------------------------- the core's side


class Farm:
    """A journaling core, one client and one executor, driven by hand."""

    def __init__(self):
        self.core = Core(Config(heartbeat_timeout_s=10.0), wall=lambda: WALL0)
        self.core.journal = []
        self.records: list = []
        self.batch = 0
        self.seq = 0
        self.core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
        self.core.on_executor(b"e1", p.Register(p.PROTOCOL_VERSION, "e1", "h", [], 1, 1, "x", 4, 1, {}, []), 0.0)
        self.flush()

    def flush(self):
        out = self.core.take_outgoing()
        self.records += self.core.take_journal()
        return out

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
    core = Core(Config(), wall=lambda: WALL0)
    core.restore(list(_wire(records)))
    core.journal = []
    return core


def _wire(records):
    """Records as replay gives them: through msgpack, so tuples come back as lists."""
    for kind, fields in records:
        yield kind, msgpack.unpackb(msgpack.packb(list(fields), use_bin_type=True))


def live(core: Core) -> tuple[list[int], list[int]]:
    """(seqs still to run in queue order, seqs with a result kept for the client)."""
    todo = [t.seq for ex in core.executors.values() for t in ex.tasks.values() if t.state in (0, 1, 2)]
    todo += [t.seq for t in core.queue if t.state == 0]
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
    [(_, refused)] = core.take_outgoing()[0]
    assert type(refused) is p.Refused and refused.reason.startswith(p.HELLO_FIRST)
    core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
    out = [m for _, m in core.take_outgoing()[0]]
    assert type(out[0]) is p.Welcome and out[0].limits["journal"] is True
    assert sorted(r.seq for m in out[1:] for r in m.results) == [1, 2]


def test_a_batch_sent_again_after_a_restart_is_not_queued_twice():
    farm = Farm()
    farm.submit(3)
    core = restored(farm.records)
    core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
    core.on_client(b"c1", p.Submit(1, [p.TaskSpec(i, 1, b"", 3, 0.0) for i in (1, 2, 3)]), 0.0)
    out = [m for _, m in core.take_outgoing()[0]]
    assert p.Accepted(1, 3) in out
    assert live(core) == ([1, 2, 3], [])


def test_losses_survive_a_restart_so_the_retry_limit_holds():
    farm = Farm()
    farm.submit(1)
    farm.take(1)
    farm.core.tick(100.0)  # the executor is lost: one loss
    farm.flush()
    core = restored(farm.records)
    assert [t.losses for t in core.queue] == [1]


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
    from falconet.dispatcher.core import ClientEntry

    client = ClientEntry(b"c", "n")
    firsts = [b for b in batches if client.first_time(b)]
    assert sorted(firsts) == sorted(set(batches))
    assert all(not client.first_time(b) for b in batches)


def test_damage_followed_by_whole_records_is_refused_and_the_file_kept(tmp_path):
    write(tmp_path, [(j.Kind.ACK, [b"c", [1]]), (j.Kind.ACK, [b"c", [2]]), (j.Kind.ACK, [b"c", [3]])])
    raw = bytearray((tmp_path / "journal").read_bytes())
    second = j._HEADER.size + (len(raw) - j._HEADER.size) // 3
    raw[second + j._RECORD.size + 2] ^= 0xFF  # inside the second record's payload
    (tmp_path / "journal").write_bytes(bytes(raw))
    with pytest.raises(JournalError, match=f"damaged at byte {second}.*truncate -s {second}"):
        list(j.Journal(tmp_path).replay())
    assert (tmp_path / "journal").read_bytes() == bytes(raw)


def test_results_are_journaled_and_sent_in_runs_bounded_by_bytes():
    core = Core(Config(max_message_bytes=1 << 20), wall=lambda: WALL0)
    core.journal = []
    big = [p.TaskResult(i, 3, b"z" * (200 << 10), "", "e", 1, 0.0, 0.0, 0.0) for i in range(10)]
    parts = list(core._chunks(big, 2))
    assert [len(x) for x in parts] == [2, 2, 2, 2, 2]  # about 512 KiB each
    assert [r for part in parts for r in part] == big
