"""The journal file (framing, torn tails, versions, lock, compaction's rewrite)."""

from __future__ import annotations

import logging
import struct

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
    core = Core(Config(max_message_bytes=1 << 20), wall=lambda: WALL0, journal_id="j1")
    big = [p.TaskResult(i, 3, b"z" * (200 << 10), "", "e", 1, 0.0, 0.0, 0.0) for i in range(10)]
    parts = list(core._chunks(big, 2))
    assert [len(x) for x in parts] == [2, 2, 2, 2, 2]  # about 512 KiB each
    assert [r for part in parts for r in part] == big
