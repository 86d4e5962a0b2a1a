"""The dispatcher's requirement matching, packing by cpus, reservations and unschedulable tasks.

The core is driven directly with an injected clock: no sockets.
"""

from __future__ import annotations

import pytest

from falconet import needs as nd
from falconet import protocol as p
from falconet import reports
from falconet.dispatcher.core import Config, Core
from falconet.dispatcher.entries import ClientEntry, ExecutorEntry, Task
from falconet.dispatcher.matching import Matcher, NeedsClass, launchable_types, why_unschedulable
from falconet.dispatcher.records import Kind

WALL0 = 1_700_000_000.0
DONE, FAILED = int(p.TaskState.DONE), int(p.TaskState.FAILED)


class Harness:
    """A Core with a hand-moved clock; helpers speak for one client and many executors."""

    def __init__(self, journal_id=None, **config):
        self.now = 0.0
        self.core = Core(Config(heartbeat_timeout_s=1e9, **config), wall=lambda: WALL0 + self.now,
                         journal_id=journal_id)
        self.records: list = []  #: journal records taken so far (with a journal_id)
        self.core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
        self.seq = 0
        self.batch = 0
        self.sent: dict[bytes, list[p.Assignment]] = {}
        self.out()

    def executor(self, peer: bytes, cpus: int = 4, memory_mb: int = 8192, tags=(), cloud=False,
                 arch="x86_64", credit=100):
        facts = {"arch": arch, "tags": list(tags)}
        if cloud:
            facts["instance_id"] = "i-" + peer.decode()
        msg = p.Register(p.PROTOCOL_VERSION, peer.decode(), "host", [], cpus, memory_mb,
                         "linux", cpus, 1, facts, [])
        self.core.on_executor(peer, msg, self.now)
        self.core.on_executor(peer, p.Report(credit, [], []), self.now)
        self.out()

    def submit(self, n: int = 1, **needs) -> list[int]:
        data = nd.encode(nd.make(**needs)) if needs else b""
        seqs = []
        specs = []
        for _ in range(n):
            self.seq += 1
            seqs.append(self.seq)
            specs.append(p.TaskSpec(self.seq, int(p.TaskKind.COMMAND), b"x", 0, 0.0, data))
        self.batch += 1
        self.core.on_client(b"c1", p.Submit(self.batch, specs), self.now)
        self.out()
        return seqs

    def dispatch(self) -> dict[bytes, list[p.Assignment]]:
        self.core.dispatch(self.now)
        return self.out()

    def finish(self, peer: bytes, tasks: list[p.Assignment], credit: int | None = None) -> None:
        results = [p.ExecResult(a.tid, a.attempt, DONE, b"", "", 0.0, 0.0) for a in tasks]
        self.core.on_executor(peer, p.Report(len(tasks) if credit is None else credit, [], results), self.now)
        self.out()
        for a in tasks:
            self.sent[peer].remove(a)

    def out(self) -> dict[bytes, list[p.Assignment]]:
        out = self.core.take_output()
        self.records += out.journal
        to_clients, to_executors = out.to_clients, out.to_executors
        got: dict[bytes, list[p.Assignment]] = {}
        for peer, msg in to_executors:
            if type(msg) is p.Tasks:
                got.setdefault(peer, []).extend(msg.tasks)
                self.sent.setdefault(peer, []).extend(msg.tasks)
        self.results = [r for _, m in to_clients if type(m) is p.Results for r in m.results]
        return got


def test_a_task_goes_only_to_an_executor_with_enough_cpus_and_memory():
    h = Harness()
    h.executor(b"small", cpus=2, memory_mb=4000)
    h.executor(b"big", cpus=8, memory_mb=20000)
    h.submit(3, cpus=4)
    got = h.dispatch()
    assert set(got) == {b"big"} and [a.cpus for a in got[b"big"]] == [4, 4], "8 cpus hold two"
    h.finish(b"big", got[b"big"], credit=0)
    h.submit(3, cpus=1, memory=8000)
    got = h.dispatch()
    assert [a.cpus for a in got[b"big"]] == [4, 1, 1], "the older class first; two 8000 MB in 20000 MB"
    assert h.core.executors[b"big"].cpus_used == 6
    assert h.core.executors[b"big"].memory_used == 16000


def test_tags_arch_and_where_choose_the_executor():
    h = Harness()
    h.executor(b"gpu", tags=["gpu"])
    h.executor(b"plain-local")
    h.executor(b"cloud", cloud=True)
    h.executor(b"arm", arch="aarch64")
    h.submit(1, tags=["gpu"])
    h.submit(1, where="cloud")
    h.submit(1, arch="arm64")
    h.submit(1, tags=["site=cloud"])
    got = h.dispatch()
    assert {peer: len(tasks) for peer, tasks in got.items()} == {b"gpu": 1, b"cloud": 2, b"arm": 1}


def test_where_local_never_runs_on_a_cloud_executor():
    h = Harness()
    h.executor(b"cloud", cloud=True)
    h.submit(2, where="local")
    assert h.dispatch() == {}
    h.executor(b"local")
    assert len(h.dispatch()[b"local"]) == 2


def test_prefer_local_uses_local_executors_first_and_bursts_to_the_cloud_when_they_are_full():
    h = Harness()
    h.executor(b"cloud", cpus=8, cloud=True)
    h.executor(b"local", cpus=2)
    got = h.dispatch() or {}
    h.submit(2, prefer="local")
    got = h.dispatch()
    assert set(got) == {b"local"}, "room on the local executor: the cloud gets nothing"
    h.submit(3, prefer="local")
    got = h.dispatch()
    assert set(got) == {b"cloud"} and len(got[b"cloud"]) == 3, "local cpus all held: burst"


def test_packing_never_gives_an_executor_more_cpus_than_it_has():
    h = Harness()
    h.executor(b"e", cpus=8)
    h.submit(5, cpus=3)
    first = h.dispatch()[b"e"]
    assert len(first) == 2, "3+3 of 8 cpus; a third would need 9"
    assert h.dispatch() == {}
    h.finish(b"e", first[:1])
    assert len(h.dispatch()[b"e"]) == 1


def test_a_large_task_reserves_an_executor_and_is_not_starved_by_small_ones():
    """A stream of 1-cpu tasks keeps a 4-cpu executor full; the 4-cpu task waits at most
    reserve_after_s before the executor stops taking small ones, then runs once it drains."""
    h = Harness(reserve_after_s=2.0)
    h.executor(b"e", cpus=4)
    h.submit(4, cpus=1, tags=[])  # plain needs: the fast path
    h.submit(4, cpus=1, memory=1)  # small tasks with needs
    got = h.dispatch()[b"e"]
    assert len(got) == 8, "plain tasks are prefetched beyond the cpus; needy ones fill the free cpus"
    h.submit(1, cpus=4)
    ran_big = False
    for _ in range(40):
        h.now += 0.5
        h.submit(2)  # the stream of small tasks never stops
        h.submit(1, cpus=1, memory=1)
        held = list(h.sent.get(b"e", []))
        if held:
            h.finish(b"e", held[:2])  # two tasks end per step
        got = h.dispatch().get(b"e", [])
        if any(a.cpus == 4 for a in got):
            ran_big = True
            assert sum(a.cpus for a in h.sent[b"e"] if a.cpus > 1) == 4
            break
    assert ran_big, "the 4-cpu task never got its cpus"
    assert h.now <= 2.0 + 0.5 * 12, f"took {h.now}s"


def test_a_reserved_executor_is_released_once_its_task_is_placed():
    h = Harness(reserve_after_s=0.0)
    h.executor(b"e", cpus=2)
    h.submit(2)
    h.dispatch()
    h.submit(1, cpus=2)
    assert h.dispatch() == {}
    assert h.core._reserved == {b"e"}
    h.submit(5)
    assert h.dispatch() == {}, "reserved: no plain tasks either"
    h.finish(b"e", list(h.sent[b"e"]))
    got = h.dispatch()[b"e"]
    assert got[0].cpus == 2, "the large task first (plain ones may queue behind it on the executor)"
    assert h.core._reserved == set()


def test_unschedulable_tasks_are_reported_with_the_reason_and_failed_after_the_limit():
    h = Harness(fail_unschedulable_s=5.0)
    h.executor(b"e", cpus=4)
    h.submit(3, cpus=16)
    h.submit(1, cpus=2)
    h.core.tick(h.now)
    status = h.core.status(h.now)
    [u] = status["unschedulable"]
    assert u["count"] == 3 and "needs 16 cpus, has 4" in u["reason"]
    h.now = 4.9
    h.core.tick(h.now)
    assert h.out() is not None and h.results == []
    h.now = 5.1
    h.core.tick(h.now)
    h.out()
    assert len(h.results) == 3 and all(r.state == FAILED and "unschedulable" in r.reason for r in h.results)
    assert h.core.status(h.now)["unschedulable"] == []


def _fleet(*types: reports.Launchable) -> p.FleetReport:
    return p.FleetReport(reports.Fleet("ec2", "test", "greedy", 0, 4, 5.0, {}, 0, can_launch=types).to_map())


def test_a_type_the_provisioner_can_launch_makes_a_task_schedulable():
    h = Harness()
    h.executor(b"e", cpus=2)
    h.submit(1, cpus=8)
    h.core.on_client(b"c1", _fleet(reports.Launchable("c5.2xlarge", 8, 16384, "x86_64", (), "cloud")), 0.0)
    h.core.tick(0.0)
    assert h.core.status(0.0)["unschedulable"] == []
    h.core.on_client(b"c1", _fleet(reports.Launchable("c5.large", 2, 4096, "x86_64", (), "cloud")), 0.0)
    h.core.tick(0.0)
    [u] = h.core.status(0.0)["unschedulable"]
    assert "1 instance types launchable" in u["reason"]


def test_a_malformed_fleet_report_is_refused_and_the_last_good_one_kept():
    h = Harness()
    h.executor(b"e", cpus=2)
    h.submit(1, cpus=8)
    h.core.on_client(b"c1", _fleet(reports.Launchable("c5.2xlarge", 8, 16384, "x86_64", (), "cloud")), 0.0)
    h.core.take_output()
    bad = _fleet().info | {"can_launch": [{"type": "c5.large", "cpus": "two"}]}
    h.core.on_client(b"c1", p.FleetReport(bad), 0.0)
    [(peer, refused)] = h.core.take_output().to_clients
    assert peer == b"c1" and type(refused) is p.Refused
    assert refused.reason.startswith("fleet report ignored: Launchable")
    h.core.tick(0.0)
    assert h.core.status(0.0)["unschedulable"] == []  # the good report still counts


def test_with_no_executor_and_no_provisioner_nothing_is_called_unschedulable():
    h = Harness()
    h.submit(1, cpus=64)
    h.core.tick(0.0)
    assert h.core.status(0.0)["unschedulable"] == []


def test_malformed_needs_fail_only_their_task():
    h = Harness()
    h.executor(b"e")
    h.core.on_client(b"c1", p.Submit(99, [
        p.TaskSpec(1, 1, b"x", 0, 0.0, b"\xc1"),
        p.TaskSpec(2, 1, b"x", 0, 0.0, nd.msgpack.packb({"cpus": 0})),
        p.TaskSpec(3, 1, b"x", 0, 0.0, nd.msgpack.packb({"colour": "red"})),
        p.TaskSpec(4, 1, b"x", 0, 0.0, b""),
    ]), 0.0)
    h.out()
    reasons = {r.seq: r.reason for r in h.results}
    assert set(reasons) == {1, 2, 3}
    assert "not msgpack" in reasons[1] and "cpus must be" in reasons[2] and "unknown: colour" in reasons[3]
    assert len(h.dispatch()[b"e"]) == 1


def test_waiting_groups_tasks_by_needs_for_the_provisioner():
    h = Harness()
    h.submit(3)
    h.submit(2, cpus=2, where="cloud")
    h.now = 7.0
    waiting = {(w["needs"]["cpus"], w["needs"]["where"]): (w["count"], w["oldest_s"])
               for w in h.core.status(h.now)["waiting"]}
    assert waiting == {(1, "any"): (3, 7.0), (2, "cloud"): (2, 7.0)}


def test_cancelled_and_requeued_tasks_keep_their_class():
    h = Harness()
    h.executor(b"e", cpus=2)
    seqs = h.submit(3, cpus=2)
    h.core.on_client(b"c1", p.Cancel([seqs[2]]), 0.0)
    h.out()
    assert [r.seq for r in h.results] == [seqs[2]]
    [a] = h.dispatch()[b"e"]
    h.core.on_executor(b"e", p.Drain([(a.tid, a.attempt)]), 0.0)  # handed back unstarted
    h.out()
    h.executor(b"e2", cpus=2)
    got = h.dispatch()[b"e2"]
    assert [x.tid for x in got] == [a.tid], "the returned task goes first"
    assert h.core.status(0.0)["waiting"][0]["count"] == 1


def test_snapshot_and_restore_keep_needs_and_files():
    h = Harness()
    h.submit(2, cpus=3, tags=["gpu"])
    h.submit(1)
    records = list(h.core.snapshot())
    fresh = Core(Config(), wall=lambda: WALL0)
    assert fresh.restore([(k, f) for k, f in records if k in (Kind.CLIENT, Kind.TASKS)]) == 3
    waiting = {w["needs"]["cpus"]: w["count"] for w in fresh.status(0.0)["waiting"]}
    assert waiting == {3: 2, 1: 1}
    assert nd.Needs(3, 0, "", ("gpu",)) in fresh.classes


@pytest.mark.parametrize("caps, need, ok", [
    (nd.Caps(4, 100, "x86_64", frozenset({"site=local"}), "local"), nd.make(cpus=4, memory=100), True),
    (nd.Caps(4, 100, "x86_64", frozenset({"site=local"}), "local"), nd.make(cpus=5), False),
    (nd.Caps(4, 100, "x86_64", frozenset({"site=local"}), "local"), nd.make(memory=101), False),
    (nd.Caps(4, 100, "arm64", frozenset({"site=local"}), "local"), nd.make(arch="aarch64"), True),
    (nd.Caps(4, 100, "arm64", frozenset({"site=cloud"}), "cloud"), nd.make(where="local"), False),
    (nd.Caps(4, 100, "arm64", frozenset({"site=cloud", "gpu"}), "cloud"), nd.make(tags=["gpu"]), True),
])
def test_caps_satisfies_and_why_not_agree(caps, need, ok):
    assert caps.satisfies(need) is ok
    assert (caps.why_not(need) == "") is ok


def test_a_reservation_ends_when_its_class_fails_as_unschedulable():
    h = Harness(reserve_after_s=0.0, fail_unschedulable_s=1.0)
    h.executor(b"e", cpus=4)
    h.executor(b"f", cpus=1, credit=0)
    h.submit(4)
    h.dispatch()
    h.submit(1, cpus=4)
    h.dispatch()
    assert h.core._reserved == {b"e"}
    h.core.on_executor(b"e", p.Bye(), h.now)  # the reserved executor leaves
    h.core.tick(h.now)
    h.now = 2.0
    h.core.tick(h.now)  # the 4-cpu task fails as unschedulable: no class is left
    h.out()
    assert [r.reason for r in h.results if r.state == FAILED][0].startswith("unschedulable")
    h.executor(b"e", cpus=4)  # back, under the same id
    assert len(h.dispatch().get(b"e", [])) == 4, "plain work flows to it again"


def test_too_many_distinct_requirement_sets_fail_the_newest_with_the_reason():
    h = Harness(max_classes=3)
    reasons = []
    for i in range(5):
        h.submit(1, tags=[f"job-{i}"])
        reasons += [r.reason for r in h.results if r.state == FAILED]
    assert len(h.core.classes) == 3 and len(reasons) == 2
    assert all("different sets of requirements" in r for r in reasons)
    h.submit(1, tags=["job-0"])  # a class already queued still takes tasks
    assert h.core.classes[nd.make(tags=["job-0"])].pending == 2


def test_a_journal_replay_queues_tasks_with_their_needs_in_their_classes():
    h = Harness(journal_id="j1")
    h.submit(2, cpus=2, where="local")
    h.submit(1)
    h.out()
    records = h.records
    fresh = Core(Config(), wall=lambda: WALL0)
    assert fresh.restore(records) == 3
    assert fresh.classes[nd.make(cpus=2, where="local")].pending == 2
    assert len(list(fresh.plain_tasks())) == 1


# ------------------------------------------------------------ the matching module on its own


def _entry(peer: bytes, cpus: int = 4, memory_mb: int = 8192, credit: int = 10) -> ExecutorEntry:
    ex = ExecutorEntry(peer, p.Register(p.PROTOCOL_VERSION, peer.decode(), "host", [], cpus, memory_mb,
                                        "linux", cpus, 1, {"arch": "x86_64"}, []), 0.0, WALL0)
    ex.credit = credit
    return ex


def _queued(matcher: Matcher, needs: nd.Needs, n: int, submitted: float = 0.0) -> NeedsClass:
    cls = matcher.class_for(needs)
    client = ClientEntry(b"c", "c")
    for seq in range(n):
        cls.queue.append(Task(client, p.TaskSpec(seq, 1, b"x", 0, 0.0, nd.encode(needs)), submitted, needs))
        cls.pending += 1
    return cls


def _pop(queue, ex, n, cpus):
    """A stand-in for the core's hot loop: takes n tasks, no counts."""
    batch = []
    while queue and len(batch) < n:
        t = queue.popleft()
        batch.append(p.Assignment(len(batch), 1, t.kind, t.body, 0.0, cpus, b""))
    return batch


def _matcher(*entries: ExecutorEntry, **config) -> Matcher:
    executors = {ex.peer: ex for ex in entries}
    return Matcher(Config(**config), executors, dict(executors), _pop)


def test_the_matcher_places_by_best_fit_and_sends_one_message_per_executor():
    small, big = _entry(b"s", cpus=2), _entry(b"b", cpus=8)
    m = _matcher(small, big)
    _queued(m, nd.make(cpus=2), 3)
    out: list = []
    assert m.dispatch(0.0, out) == set()
    assert [(peer, len(msg.tasks)) for peer, msg in out] == [(b"s", 1), (b"b", 2)]
    assert (small.cpus_used, big.cpus_used, small.credit, big.credit) == (2, 4, 9, 8)
    m.dispatch(0.0, [])
    assert m.classes == {}, "an emptied class is dropped at the next turn"


def test_the_matcher_reserves_the_executor_with_most_free_cpus_after_the_wait():
    a, b = _entry(b"a", cpus=4), _entry(b"b", cpus=4)
    a.cpus_used, b.cpus_used = 3, 2
    m = _matcher(a, b, reserve_after_s=1.0)
    _queued(m, nd.make(cpus=4), 1)
    assert m.dispatch(0.0, []) == set()
    assert m.dispatch(1.0, []) == {b"b"}
    b.cpus_used = 3  # it stays reserved even once another has more free cpus
    assert m.dispatch(2.0, []) == {b"b"}


def test_the_matcher_recomputes_eligibility_only_when_the_registry_changes():
    ex = _entry(b"e", cpus=2)
    m = _matcher(ex)
    cls = _queued(m, nd.make(cpus=4), 1)
    m.eligible(cls)
    assert cls.eligible == {}
    ex.caps = nd.Caps(8, 8192, "x86_64", ex.caps.tags, ex.caps.site)
    m.eligible(cls)
    assert cls.eligible == {}, "unchanged generation: the cached answer stands"
    m.gen += 1
    m.eligible(cls)
    assert cls.eligible == {b"e": ex}


def test_check_returns_the_classes_past_the_limit_with_their_reason():
    m = _matcher(_entry(b"e", cpus=2), fail_unschedulable_s=5.0)
    _queued(m, nd.make(cpus=8), 2)
    assert m.check(0.0, None, 0) == []
    [(cls, reason)] = m.check(5.0, None, 0)
    assert cls.needs == nd.make(cpus=8) and reason.startswith("unschedulable: needs") and "5s" in reason


def test_launchable_types_need_a_report():
    assert launchable_types(None) is None
    fleet = reports.Fleet.from_map(_fleet(reports.Launchable("big", 8, 1024, "", ("gpu",), "local")).info)
    assert [(name, caps.cpus, caps.tags, caps.site) for name, caps in launchable_types(fleet)] == [
        ("big", 8, frozenset({"gpu"}), "local")]


def test_why_unschedulable_counts_the_reasons_and_names_the_fleet():
    executors = {b"a": _entry(b"a", cpus=2), b"b": _entry(b"b", cpus=2)}
    assert why_unschedulable(nd.make(cpus=2), executors, None) == ""
    why = why_unschedulable(nd.make(cpus=4), executors, [])
    assert "2 executors connected, 0 instance types launchable" in why and "2x needs 4 cpus, has 2" in why
    assert why_unschedulable(nd.make(cpus=64), {}, None) == "", "nothing to judge by: no verdict"


def test_eligibility_follows_joins_reconnects_and_leaves_without_a_rescan():
    """Executors joining, re-registering with other tags and leaving while tasks with needs
    wait: each class's eligible set is kept current one executor at a time (no scan of the
    registry per class per change, which made 54,000 joins quadratic), and always equals
    what a full recompute gives."""
    h = Harness()
    h.submit(3, tags=["gpu"])
    h.dispatch()
    m = h.core.matcher
    (cls,) = m.classes.values()
    m.eligible(cls)

    def agrees() -> bool:
        return cls.gen == m.gen and cls.eligible == {
            peer: ex for peer, ex in h.core.executors.items() if ex.caps.satisfies(cls.needs)}

    h.executor(b"cpu", credit=0)
    assert agrees() and cls.eligible == {}
    h.executor(b"gpu", tags=["gpu"], credit=0)
    assert agrees() and set(cls.eligible) == {b"gpu"}
    h.executor(b"cpu", tags=["gpu"], credit=0)  # reconnects, now with a GPU
    assert agrees() and set(cls.eligible) == {b"cpu", b"gpu"}
    h.executor(b"gpu", credit=0)  # reconnects without it
    assert agrees() and set(cls.eligible) == {b"cpu"}
    h.core.on_executor(b"cpu", p.Bye(), h.now)
    assert agrees() and cls.eligible == {}
    m.gen += 1  # a change made behind the matcher's back: the next use recomputes
    h.executor(b"late", tags=["gpu"], credit=5)
    assert cls.gen != m.gen, "a stale set stays stale until recomputed"
    assert sum(len(ts) for ts in h.dispatch().values()) == 3
