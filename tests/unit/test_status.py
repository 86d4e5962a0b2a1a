"""The dispatcher's statistics (dispatcher/status.py): the status map, waiting lists, tasks/s."""

from __future__ import annotations

from falconet import needs as nd
from falconet import protocol as p
from falconet.dispatcher import status
from falconet.dispatcher.core import ClientEntry, Config, Core
from falconet.dispatcher.entries import ExecutorEntry, Task
from falconet.dispatcher.matching import NeedsClass

WALL0 = 1_700_000_000.0
PENDING, RUNNING = int(p.TaskState.PENDING), int(p.TaskState.RUNNING)


def _spec(seq, kind=p.TaskKind.COMMAND):
    return p.TaskSpec(seq, int(kind), b"body-%d" % seq, 0, 0.0)


def _register(peer: bytes, slots: int = 2) -> p.Register:
    return p.Register(p.PROTOCOL_VERSION, peer.decode(), f"host-{peer.decode()}", ["192.0.2.7", "fe80::7"], 8,
                      16 << 10, "linux-x86_64", slots, 4242, {"instance_id": "i-0abc"}, [])


def _task(client: ClientEntry, seq: int, submitted: float, needs: nd.Needs | None = None) -> Task:
    return Task(client, p.TaskSpec(seq, 1, b"x", 0, 0.0), submitted, needs)


def test_status_keys_and_executor_table():
    core = Core(Config(), wall=lambda: WALL0)
    core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
    core.on_client(b"c1", p.Submit(1, [_spec(0), _spec(1), _spec(2, kind=9)]), 0.0)
    core.on_executor(b"e1", _register(b"e1", slots=3), 0.0)
    core.on_executor(b"e1", p.Report(1, [], []), 0.0)
    core.dispatch(0.0)
    core.take_output()
    info = core.status(2.0)
    assert info["queued"] == 1
    assert info["tasks"] == {"pending": 1, "dispatched": 1, "running": 0, "done": 0, "failed": 1, "cancelled": 0}
    assert info["executors"] == 1 and info["slots"] == 3 and info["busy"] == 1
    assert info["submitted_total"] == 3 and info["clients"] == 1
    assert info["version"] == p.PROTOCOL_VERSION
    assert "executor_table" not in info and "fleet" not in info  # detail only when asked

    core.on_client(b"c1", p.StatusRequest(17, True), 2.0)
    to_clients = core.take_output().to_clients
    ((peer, reply),) = to_clients
    assert type(reply) is p.StatusReply and reply.req_id == 17
    info = reply.info
    assert info["client"]["pending"] == 1 and info["client"]["failed"] == 1
    (row,) = info["executor_table"]
    assert row["id"] == "e1" and row["host"] == "host-e1"
    assert row["addresses"] == ["192.0.2.7", "fe80::7"]
    assert (row["slots"], row["assigned"], row["busy"], row["state"]) == (3, 1, 0, "active")
    assert row["last_seen_s"] == 2.0 and row["registered"] == WALL0
    assert row["facts"] == {"instance_id": "i-0abc"}
    assert info["recent_lost"] == []
    p.decode(p.encode(reply))  # the whole map crosses the wire


def test_the_rate_is_completions_over_the_window_and_forgets_older_ones():
    rate = status.Rate(10.0)
    assert rate.per_s(0.0) == 0.0
    rate.note(0.2, 5)
    rate.note(0.7, 5)  # the same second: one bucket
    assert len(rate.times) == 1 and rate.per_s(0.9) == 10.0, "under a second counts as one"
    rate.note(4.0, 10)
    assert rate.per_s(5.0) == 4.0
    assert rate.per_s(14.0) == 1.0 and len(rate.times) == 1, "the first second left the window"
    for second in range(100, 200):
        rate.note(float(second), 1)
    assert len(rate.times) <= 12, "memory stays bounded by the window"


def test_waiting_counts_plain_tasks_apart_from_the_classes_and_lists_the_unschedulable():
    client = ClientEntry(b"c", "c")
    cancelled = _task(client, 1, 1.0)
    cancelled.state = int(p.TaskState.CANCELLED)
    plain = [cancelled, _task(client, 2, 2.0), _task(client, 3, 3.0)]
    big = NeedsClass(nd.make(cpus=64))
    big.queue.append(_task(client, 4, 4.0, big.needs))
    big.pending = 1
    big.unschedulable, big.unschedulable_since = "needs 64 cpus: no executor can run it", 6.0
    empty = NeedsClass(nd.make(cpus=2))
    heads = [plain[1]]  # the client's oldest pending plain task (the cancelled one is not)
    waiting, unschedulable = status.waiting(3, heads, [big, empty], 10.0, 9.0)
    assert [(w.needs.cpus, w.count, w.oldest_s, w.reason) for w in waiting] == [(1, 2, 8.0, ""), (64, 1, 6.0, "")]
    [u] = unschedulable
    assert u.reason.startswith("needs 64 cpus") and u.since_s == 3.0 and u.count == 1


def test_an_executor_row_counts_running_tasks_and_idle_time_only_when_idle():
    ex = ExecutorEntry(b"e", _register(b"e"), 0.0, WALL0)
    assert status.executor_row(ex, 5.0).idle_s == 5.0
    client = ClientEntry(b"c", "c")
    t1, t2 = _task(client, 1, 0.0), _task(client, 2, 0.0)
    t1.state, t2.state = int(p.TaskState.DISPATCHED), RUNNING
    ex.tasks = {1: t1, 2: t2}
    row = status.executor_row(ex, 5.0)
    assert (row.busy, row.assigned, row.idle_s, row.memory_mb) == (1, 2, 0.0, 16 << 10)
