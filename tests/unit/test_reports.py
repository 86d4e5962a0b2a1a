"""falconet/reports.py: the typed status and fleet report survive the wire, and a wrong map
is refused with the field it got wrong."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from falconet import needs as nd
from falconet import reports as r
from falconet.errors import ProtocolError

words = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8)
counts = st.integers(0, 10**9)
seconds = st.floats(0, 1e9, allow_nan=False)
needs = st.builds(nd.make, cpus=st.integers(1, 64), memory=st.integers(0, 10**6),
                  arch=st.sampled_from(["", "x86_64", "arm64"]), tags=st.lists(words, max_size=3),
                  where=st.sampled_from(["any", "local", "cloud"]))
waiting = st.builds(r.Waiting, needs, counts, seconds, st.sampled_from(["", "no executor can run it"]), seconds)
rows = st.builds(
    r.ExecutorRow, id=words, host=words, addresses=st.tuples(words), pid=counts, cpus=counts, memory_mb=counts,
    platform=words, slots=counts, state=st.sampled_from(["active", "draining"]), busy=counts, assigned=counts,
    completed=counts, last_seen_s=seconds, idle_s=seconds, registered=seconds, arch=words, site=words,
    tags=st.lists(words, max_size=3).map(tuple), cpus_used=counts, memory_used_mb=counts,
    facts=st.dictionaries(words, words, max_size=2))
fleets = st.builds(
    r.Fleet, backend=words, cluster=words, policy=words, min_executors=counts, max_executors=counts,
    interval_s=seconds, counts=st.dictionaries(words, counts, max_size=3), registered=counts,
    nodes=st.lists(st.builds(r.FleetNode, words, words, words, seconds, st.none() | words), max_size=3).map(tuple),
    decisions=st.lists(st.builds(r.Decision, seconds, st.lists(words, max_size=2).map(tuple), counts),
                       max_size=2).map(tuple),
    can_launch=st.lists(st.builds(r.Launchable, words, counts, counts, words, st.tuples(words), words),
                        max_size=2).map(tuple))
statuses = st.builds(
    r.Status, dispatcher_id=words, version=counts, uptime_s=seconds, durability=words, queued=counts,
    tasks=st.dictionaries(words, counts, max_size=3), submitted_total=counts, tasks_per_s=seconds,
    executors=counts, slots=counts, busy=counts, lost_executors=counts, stale_results=counts, clients=counts,
    unacknowledged_results=counts, waiting=st.lists(waiting, max_size=3).map(tuple),
    unschedulable=st.lists(waiting, max_size=2).map(tuple), detail=st.just(True),
    executor_table=st.lists(rows, max_size=3).map(tuple), fleet=st.none() | fleets)


def wire(m: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(m, use_bin_type=True), raw=False)


@given(statuses)
def test_a_status_survives_the_wire(status):
    assert r.Status.from_map(wire(status.to_map())) == status


@given(fleets)
def test_a_fleet_report_survives_the_wire(fleet):
    assert r.Fleet.from_map(wire(fleet.to_map())) == fleet


def _status(**kw) -> r.Status:
    return r.Status("d", 5, 1.0, "in-memory", 0, {}, 0, 0.0, 0, 0, 0, 0, 0, 1, 0, **kw)


def test_without_detail_the_map_leaves_the_detail_out():
    m = _status().to_map()
    assert "executor_table" not in m and "fleet" not in m and "recent_lost" not in m
    assert r.Status.from_map(m) == _status()


def test_keys_a_reader_does_not_know_are_ignored():
    assert r.Status.from_map({**_status().to_map(), "added_later": {"x": 1}}) == _status()


@pytest.mark.parametrize(("change", "message"), [
    ({"queued": "3"}, "Status.queued must be int, not str"),
    ({"queued": True}, "Status.queued must be int, not bool"),
    ({"waiting": {}}, "Status.waiting must be a list, not dict"),
    ({"waiting": [{"needs": {"cpus": 0}, "count": 1, "oldest_s": 0.0}]}, "Waiting.needs: cpus must be"),
    ({"waiting": [{"count": 1, "oldest_s": 0.0}]}, "Waiting lacks 'needs'"),
    ({"detail": True, "fleet": [1]}, "Fleet must be a map, not list"),
    ({"detail": True, "executor_table": ["row"]}, "ExecutorRow must be a map, not str"),
])
def test_a_wrong_map_names_the_field(change, message):
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(")):
        r.Status.from_map({**_status().to_map(), **change})


def test_a_missing_field_is_named():
    m = _status().to_map()
    del m["dispatcher_id"]
    with pytest.raises(ProtocolError, match="Status lacks 'dispatcher_id'"):
        r.Status.from_map(m)


def test_a_launchable_type_offers_what_its_executor_would():
    t = r.Launchable("c5.large", 2, 4096, "x86_64", ("site=cloud",), "cloud")
    assert t.caps.satisfies(nd.make(cpus=2, memory=4096, where="cloud"))
    assert not t.caps.satisfies(nd.make(cpus=3))
