"""The loop's side of a turn, without sockets: what the core hands over, and the order in
which the server applies it (journal on disk before any message goes out)."""

from __future__ import annotations

import pytest

from falconet import protocol as p
from falconet.dispatcher.core import Config, Core, TurnOutput
from falconet.dispatcher.records import Kind
from falconet.dispatcher.server import apply_output

WALL0 = 1_700_000_000.0


def register(peer: bytes, slots: int = 2) -> p.Register:
    return p.Register(p.PROTOCOL_VERSION, peer.decode(), "h", [], slots, 1024, "linux", slots, 1, {}, [])


def journaling_core() -> Core:
    core = Core(Config(), wall=lambda: WALL0, journal_id="j1")
    core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
    core.on_executor(b"e1", register(b"e1"), 0.0)
    core.take_output()
    return core


class Recorder:
    """A journal and two senders writing into one log, so the order of calls shows."""

    def __init__(self, unreachable: frozenset[bytes] = frozenset()):
        self.calls: list[tuple] = []
        self.unreachable = unreachable

    def commit(self, records: list) -> None:
        self.calls.append(("commit", [kind for kind, _ in records]))

    def to_client(self, peer: bytes, msg) -> bool:
        self.calls.append(("client", peer, type(msg)))
        return True

    def to_executor(self, peer: bytes, msg) -> bool:
        self.calls.append(("executor", peer, type(msg)))
        return peer not in self.unreachable


def test_journaling_is_set_at_construction_and_welcome_names_the_journal():
    core = journaling_core()
    core.on_client(b"c2", p.Hello(p.PROTOCOL_VERSION, "c2", "test"), 0.0)
    welcome = core.take_output().to_clients[0][1]
    assert welcome.limits["journal"] is True and welcome.limits["journal_id"] == "j1"
    plain = Core(Config(), wall=lambda: WALL0, reporters={"blobs": lambda: {"x": 1}})
    plain.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "test"), 0.0)
    out = plain.take_output()
    assert out.journal == [] and out.to_clients[0][1].limits["journal"] is False
    assert plain.status(0.0)["blobs"] == {"x": 1}
    with pytest.raises(ValueError, match="colour"):
        Core(Config(), reporters={"colour": dict})


def test_a_turn_of_work_is_one_output_with_its_records_and_its_messages():
    core = journaling_core()
    core.on_client(b"c1", p.Submit(1, [p.TaskSpec(1, 1, b"x", 0, 0.0)]), 0.0)
    core.on_executor(b"e1", p.Report(1, [], []), 0.0)
    core.dispatch(0.0)
    out = core.take_output()
    assert isinstance(out, TurnOutput)
    assert [kind for kind, _ in out.journal] == [Kind.SUBMIT]
    assert [type(m) for _, m in out.to_clients] == [p.Accepted]
    assert [type(m) for _, m in out.to_executors] == [p.Tasks]
    assert core.take_output() == TurnOutput([], [], [], [], [], [])  # taking it cleared it


def test_nothing_is_sent_before_the_turn_is_journaled():
    core = journaling_core()
    core.on_client(b"c1", p.Submit(1, [p.TaskSpec(1, 1, b"x", 0, 0.0), p.TaskSpec(2, 1, b"y", 0, 0.0)]), 0.0)
    core.on_executor(b"e1", p.Report(1, [], []), 0.0)
    core.dispatch(0.0)
    core.on_client(b"c1", p.Cancel([2]), 0.0)  # a result, journaled as RESULTS when taken
    rec = Recorder()
    assert apply_output(core.take_output(), rec.commit, rec.to_client, rec.to_executor) == []
    assert rec.calls[0] == ("commit", [Kind.SUBMIT, Kind.RESULTS])
    assert sorted(rec.calls[1:], key=str) == sorted([("client", b"c1", p.Accepted), ("client", b"c1", p.Results),
                                                     ("executor", b"e1", p.Tasks)], key=str)


def test_without_a_journal_the_output_is_only_sent():
    rec = Recorder()
    out = TurnOutput([], [(b"c1", p.Accepted(1, 1))], [(b"e1", p.Heartbeat())], [], [], [])
    apply_output(out, None, rec.to_client, rec.to_executor)
    assert rec.calls == [("executor", b"e1", p.Heartbeat), ("client", b"c1", p.Accepted)], \
        "executors first: their tasks start while the clients hear"


def test_messages_for_unreachable_executors_come_back_and_the_core_takes_the_tasks_back():
    core = journaling_core()
    core.on_client(b"c1", p.Submit(1, [p.TaskSpec(1, 1, b"x", 0, 0.0)]), 0.0)
    core.on_executor(b"e1", p.Report(1, [], []), 0.0)
    core.dispatch(0.0)
    rec = Recorder(unreachable=frozenset({b"e1"}))
    unreachable = apply_output(core.take_output(), rec.commit, rec.to_client, rec.to_executor)
    assert [(peer, type(m)) for peer, m in unreachable] == [(b"e1", p.Tasks)]
    for peer, msg in unreachable:
        core.executor_unreachable(peer, msg)
    out = core.take_output()
    assert out.departed == [b"e1"] and not core.knows_executor(b"e1")
    assert core.status(0.0)["queued"] == 1  # never arrived: queued again, not counted lost


def test_known_peers_and_the_answer_to_strangers():
    core = journaling_core()
    assert core.knows_client(b"c1") and not core.knows_client(b"c9")
    assert core.knows_executor(b"e1") and not core.knows_executor(b"e9")
    core.answer_stranger(b"c9", "client")
    core.answer_stranger(b"e9", "executor")
    out = core.take_output()
    assert [(peer, type(m)) for peer, m in out.to_clients] == [(b"c9", p.HelloAgain)]
    assert [(peer, type(m)) for peer, m in out.to_executors] == [(b"e9", p.Reregister)]


def test_a_result_with_files_is_handed_over_in_the_output():
    core = journaling_core()
    core.on_client(b"c1", p.Submit(1, [p.TaskSpec(1, 1, b"x", 0, 0.0)]), 0.0)
    core.on_executor(b"e1", p.Report(1, [], []), 0.0)
    core.dispatch(0.0)
    [(_, tasks)] = core.take_output().to_executors
    a = tasks.tasks[0]
    done = p.ExecResult(a.tid, a.attempt, int(p.TaskState.DONE), b"", "", 1.0, 2.0, b"files")
    core.on_executor(b"e1", p.Report(0, [], [done]), 0.0)
    assert core.take_output().delivered_files == [(b"c1", b"e1", b"files")]


def test_a_turn_reads_a_port_for_at_most_read_s(monkeypatch):
    """A burst (say, many large Submits) is read over several turns, not in one turn that
    holds back the other port and looks like a stall."""
    import zmq

    from falconet.dispatcher import server as srv

    server = srv.Server()
    ctx = zmq.Context()
    client = ctx.socket(zmq.DEALER)
    try:
        client.connect(server.client_address)
        for i in range(5):
            client.send(p.encode(p.StatusRequest(i, False)))
        seen: list = []

        def take(limit_s: float) -> int:
            monkeypatch.setattr(srv, "READ_S", limit_s)
            before = len(seen)
            assert server.client_sock.poll(10_000), "the requests never came"
            server._receive(server.client_sock, lambda peer, msg, now: seen.append(msg.req_id), 0.0, "client")
            return len(seen) - before

        assert take(0.0) == 1, "past READ_S after the first message: the rest waits"
        while len(seen) < 5:
            take(60.0)
        assert seen == [0, 1, 2, 3, 4] and server.messages["client", "in"] == 5
    finally:
        client.close(linger=0)
        ctx.term()
        server.close()
