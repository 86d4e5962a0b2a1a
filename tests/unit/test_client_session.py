"""Example tests of the client's session, driven directly: no sockets, time passed in."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib

import pytest

from falconet import protocol as p
from falconet import staging, tasks
from falconet.client_session import HELLO_AGAIN_S, PING_S, ClientSession
from falconet.errors import DispatcherUnavailable, RefusedError, TaskError
from falconet.futures import TaskFuture

DONE, FAILED, CANCELLED = int(p.TaskState.DONE), int(p.TaskState.FAILED), int(p.TaskState.CANCELLED)
PYTHON, COMMAND = int(p.TaskKind.PYTHON), int(p.TaskKind.COMMAND)
TIMEOUT_S = 60.0


class Harness:
    """A welcomed session, and the client's half of submitting: futures and specs made here."""

    def __init__(self, journal_id: str = "j1", **limits):
        self.s = ClientSession("c1", "test", "tcp://127.0.0.1:5555", TIMEOUT_S)
        self.seq = 0
        self.s.start(0.0)
        assert self.out() == [p.Hello(p.PROTOCOL_VERSION, "c1", "test")]
        self.welcome("d1", journal_id, **limits)
        assert self.out() == []

    def welcome(self, dispatcher_id: str, journal_id: str, now: float = 0.0, **limits):
        limits["journal_id"] = journal_id
        return self.deliver(p.Welcome(p.PROTOCOL_VERSION, dispatcher_id, limits), now)

    def _cancel(self, seq: int) -> None:  # TaskFuture.cancel() tells its client this
        self.s.cancel(seq)

    def queue(self, *values, blobs: dict[str, str] | None = None) -> list[TaskFuture]:
        """Queue python tasks (the body is the value they will return, pickled)."""
        queued = []
        for value in values:
            self.seq += 1
            fut = TaskFuture(self, self.seq, PYTHON, f"task {self.seq}")
            fut.blobs = tuple(blobs or ())
            queued.append((p.TaskSpec(self.seq, PYTHON, tasks.encode_python_value(value), 3, 0.0), fut))
        self.s.add(queued, blobs, {d: f"/spool/{d}" for d in blobs or {}})
        return [f for _, f in queued]

    def submit(self, *values) -> list[TaskFuture]:
        """Queue and send."""
        futures = self.queue(*values)
        self.s.flush()
        self.out()
        return futures

    def deliver(self, msg, now: float = 0.0) -> list:
        self.s.heard(now)
        self.s.handle(msg, now)
        return self.out()

    def out(self) -> list:
        return self.s.take_output().messages


def done(fut: TaskFuture, value=None) -> p.TaskResult:
    value = fut.seq * 10 if value is None else value
    return p.TaskResult(fut.seq, DONE, tasks.encode_python_value(value), "", "ex1", 1, 0.0, 0.0, 0.0)


def failed(fut: TaskFuture, reason: str = "lost 4 times") -> p.TaskResult:
    return p.TaskResult(fut.seq, FAILED, b"", reason, "ex1", 4, 0.0, 0.0, 0.0)


def submits(messages: list) -> list[p.Submit]:
    return [m for m in messages if type(m) is p.Submit]


# ---------------------------------------------------------------- connecting


def test_the_first_welcome_resolves_the_connection_and_sets_the_limits():
    h = Harness(max_submit_batch=7, max_message_bytes=1 << 20, max_output_bytes=4096)
    assert h.s.welcome.result(0).dispatcher_id == "d1"
    assert (h.s.dispatcher_id, h.s.max_batch, h.s.max_message_bytes, h.s.max_output_bytes) == ("d1", 7, 1 << 20, 4096)


def test_a_refusal_before_the_welcome_fails_the_connection():
    s = ClientSession("c1", "test", "tcp://127.0.0.1:5555")
    s.start(0.0)
    s.handle(p.Refused("protocol version 3 is not spoken here"), 0.0)
    with pytest.raises(RefusedError, match="version 3"):
        s.welcome.result(0)


def test_a_refusal_after_the_welcome_is_only_logged(caplog):
    h = Harness()
    assert h.deliver(p.Refused("no")) == []
    assert "refused a request: no" in caplog.text


# ---------------------------------------------------------------- submitting


def test_only_the_first_request_after_a_flush_wakes_the_thread():
    h = Harness()
    fut = TaskFuture(h, 1, PYTHON)
    spec = p.TaskSpec(1, PYTHON, b"x", 3, 0.0)
    assert h.s.add([(spec, fut)]) is True
    assert h.s.add([]) is False
    assert h.s.cancel(1) is False
    assert h.s.control(p.FleetReport({})) is False
    h.s.flush()
    assert h.s.control(p.FleetReport({})) is True


def test_a_flush_sends_the_outbox_as_one_submit_and_the_tasks_are_outstanding_until_their_result():
    h = Harness()
    futures = h.queue("a", "b", "c")
    assert h.s.pending() == 3 and h.s.futures == {}
    h.s.flush()
    [submit] = submits(h.out())
    assert [t.seq for t in submit.tasks] == [1, 2, 3]
    assert set(h.s.futures) == {1, 2, 3} and h.s.pending() == 3
    assert list(h.s.unaccepted) == [submit.batch]
    assert h.deliver(p.Accepted(submit.batch, len(submit.tasks))) == []
    assert h.s.unaccepted == {}
    h.deliver(p.Results([done(futures[1], "B")]))
    assert set(h.s.futures) == {1, 3} and h.s.pending() == 2
    assert futures[1].result(0) == "B" and not futures[0].done()


def test_batches_respect_the_task_count_limit():
    h = Harness(max_submit_batch=2)
    h.queue(*range(5))
    h.s.flush()
    assert [[t.seq for t in m.tasks] for m in submits(h.out())] == [[1, 2], [3, 4], [5]]


def test_batches_respect_the_message_budget_and_an_oversized_task_fails_alone():
    h = Harness(max_message_bytes=2000)  # a budget of 1000 bytes of records per message
    budget = p.record_budget(2000)
    small = ["x" * 300] * 4
    futures = h.queue(*small[:2], "y" * 2000, *small[2:])
    h.s.flush()
    sent = submits(h.out())
    assert [[t.seq for t in m.tasks] for m in sent] == [[1, 2], [4, 5]]
    for m in sent:
        assert sum(len(t.body) + p.RECORD_OVERHEAD for t in m.tasks) <= budget
    with pytest.raises(ValueError, match="larger than the dispatcher accepts"):
        futures[2].result(0)
    assert 3 not in h.s.futures


def test_batch_numbers_grow_and_each_batch_is_remembered_until_accepted():
    h = Harness(max_submit_batch=1)
    h.queue("a", "b")
    h.s.flush()
    first, second = submits(h.out())
    assert second.batch == first.batch + 1
    h.deliver(p.Accepted(second.batch, len(second.tasks)))
    assert list(h.s.unaccepted) == [first.batch]


# ---------------------------------------------------------------- results


def test_a_result_resolves_its_future_and_is_acked_once_per_burst():
    h = Harness()
    a, b = h.submit("a", "b")
    h.s.handle(p.Results([done(a)]), 0.0)
    h.s.handle(p.Results([done(b)]), 0.0)
    assert h.out() == [p.Ack([a.seq, b.seq])]
    assert (a.result(0), b.result(0)) == (10, 20)
    assert a.info.executor == "ex1"


def test_a_failed_result_raises_task_error_with_the_reason():
    h = Harness()
    [fut] = h.submit("a")
    h.deliver(p.Results([failed(fut)]))
    with pytest.raises(TaskError, match="lost 4 times"):
        fut.result(0)


def test_a_command_result_becomes_a_command_result():
    h = Harness()
    fut = TaskFuture(h, 1, COMMAND, "echo hi")
    h.s.add([(p.TaskSpec(1, COMMAND, tasks.encode_command("echo hi"), 3, 0.0), fut)])
    h.s.flush()
    output = tasks.encode_command_output(0, b"hi\n", b"", False)
    h.deliver(p.Results([p.TaskResult(1, DONE, output, "", "ex1", 1, 0.0, 0.0, 0.0)]))
    assert (fut.result(0).stdout, fut.result(0).ok) == ("hi\n", True)


def test_a_duplicate_or_unknown_result_resolves_nothing_but_is_acked():
    h = Harness()
    [fut] = h.submit("a")
    calls = []
    fut.add_done_callback(calls.append)
    h.deliver(p.Results([done(fut, "first")]))
    assert h.deliver(p.Results([done(fut, "second"), p.TaskResult(99, DONE, b"", "", "", 1, 0, 0, 0)])) == [
        p.Ack([fut.seq, 99])]
    assert fut.result(0) == "first" and len(calls) == 1


def test_a_result_for_a_future_cancelled_here_leaves_it_cancelled():
    h = Harness()
    [fut] = h.submit("a")
    assert fut.cancel()
    h.s.flush()
    assert h.out() == [p.Cancel([fut.seq])]
    h.deliver(p.Results([done(fut)]))
    assert fut.cancelled() and h.s.futures == {}


def test_a_cancelled_result_cancels_the_future():
    h = Harness()
    [fut] = h.submit("a")
    h.deliver(p.Results([p.TaskResult(fut.seq, CANCELLED, b"", "cancelled", "", 0, 0.0, 0.0, 0.0)]))
    assert fut.cancelled()


def test_a_cancel_is_sent_after_the_submits_of_the_same_flush():
    h = Harness()
    [fut] = h.queue("a")
    h.s.flush()
    h.out()
    [other] = h.queue("b")
    fut.cancel()
    h.s.flush()
    assert [type(m) for m in h.out()] == [p.Submit, p.Cancel]


def test_cancel_unstarted_cancels_here_and_asks_the_dispatcher_but_spares_running_tasks():
    h = Harness()
    sent, running = h.submit("a", "r")
    unsent = h.queue("b")[0]
    h.deliver(p.Started([running.seq]))
    h.s.cancel_unstarted()
    assert unsent.cancelled() and sent.cancelled()
    assert running.running() and not running.done()
    h.s.flush()
    assert h.out() == [p.Cancel([sent.seq])]  # the unsent one was never sent: nothing to ask


# ---------------------------------------------------------------- started, outstanding


def test_started_marks_futures_running_and_then_cancel_returns_false():
    h = Harness()
    a, b = h.submit("a", "b")
    assert h.deliver(p.Started([a.seq])) == []
    assert a.running() and not b.running()
    assert not a.cancel() and not a.cancelled()
    assert b.cancel() and b.cancel() and b.cancelled()  # a second cancel is harmless
    h.deliver(p.Results([done(a)]))
    assert a.result(0) == a.seq * 10 and not a.running()


def test_started_ignores_unknown_done_and_cancelled_tasks():
    h = Harness()
    a, b = h.submit("a", "b")
    b.cancel()
    h.deliver(p.Results([done(a)]))
    h.deliver(p.Started([a.seq, b.seq, 999]))  # a start and its result in one turn: Started first
    assert a.result(0) == a.seq * 10 and b.cancelled()


def test_a_cancelled_result_for_a_running_task_fails_its_future_with_cancelled_error():
    h = Harness()
    [a] = h.submit("a")
    h.deliver(p.Started([a.seq]))
    h.deliver(p.Results([p.TaskResult(a.seq, CANCELLED, b"", "dropped", "ex1", 1, 0.0, 0.0, 0.0)]))
    with pytest.raises(cf.CancelledError, match="dropped"):
        a.result(0)


def test_outstanding_lists_unsent_and_sent_unfinished_futures():
    h = Harness()
    a, b = h.submit("a", "b")
    c = h.queue("c")[0]
    assert set(h.s.outstanding()) == {a, b, c}
    h.deliver(p.Results([done(a)]))
    b.cancel()
    assert h.s.outstanding() == [c]
    h.s.flush()
    assert h.s.outstanding() == [c]


def test_fail_all_and_fail_unsent_fail_every_future_once():
    h = Harness()
    sent = h.submit("a")[0]
    unsent = h.queue("b")[0]
    h.s.fail_all(RuntimeError("closed"))
    h.s.fail_unsent(RuntimeError("never sent"))
    with pytest.raises(RuntimeError, match="closed"):
        sent.result(0)
    with pytest.raises(RuntimeError, match="never sent"):
        unsent.result(0)
    assert h.s.pending() == 0 and h.s.unaccepted == {}


# ---------------------------------------------------------------- a restarted dispatcher


def test_hello_again_says_hello_once_per_answer():
    h = Harness()
    hello = p.Hello(p.PROTOCOL_VERSION, "c1", "test")
    assert h.deliver(p.HelloAgain("who?"), now=100.0) == [hello]
    assert h.deliver(p.HelloAgain("who?"), now=100.0 + HELLO_AGAIN_S / 2) == []
    assert h.deliver(p.HelloAgain("who?"), now=100.0 + HELLO_AGAIN_S) == [hello]
    h.welcome("d1", "j1", now=101.0 + HELLO_AGAIN_S)
    assert h.deliver(p.HelloAgain("who?"), now=102.0 + HELLO_AGAIN_S) == [hello]


def test_a_welcome_from_the_same_dispatcher_sends_the_unaccepted_batches_again():
    h = Harness(max_submit_batch=1)
    h.queue("a", "b")
    h.s.flush()
    first, second = submits(h.out())
    h.deliver(p.Accepted(first.batch, len(first.tasks)))
    assert h.welcome("d1", "j1") == [second]


def test_a_restart_from_the_same_journal_resends_batches_and_status_requests():
    h = Harness()
    a, b = h.submit("a", "b")
    [unaccepted] = h.s.unaccepted.items()
    req, answer, _ = h.s.ask_status(False)
    h.s.flush()
    assert h.out() == [p.StatusRequest(req, False)]
    h.deliver(p.HelloAgain("restarted"), now=5.0)
    out = h.welcome("d2", "j1", now=5.0)
    assert out == [p.StatusRequest(req, False), p.Submit(*unaccepted)]
    assert h.s.dispatcher_id == "d2" and not a.done()
    h.deliver(p.Results([done(a)]))
    assert a.result(0) == 10
    h.deliver(p.StatusReply(req, {"tasks": {}}))
    assert answer.result(0) == {"tasks": {}}


@pytest.mark.parametrize("journal_id", ["", "j2"])
def test_a_restart_without_our_journal_fails_the_tasks_out_and_ignores_their_late_results(journal_id):
    h = Harness()
    a, b = h.submit("a", "b")
    assert h.welcome("d2", journal_id) == []
    for fut in (a, b):
        with pytest.raises(DispatcherUnavailable, match="restarted .* lost this task"):
            fut.result(0)
    assert h.s.futures == {} and h.s.unaccepted == {}
    h.deliver(p.Results([done(a)]))  # nothing to resolve, nothing raised
    c = h.submit("c")[0]
    h.deliver(p.Results([done(c)]))
    assert c.result(0) == 30


def test_a_forgotten_status_request_is_not_asked_again():
    h = Harness()
    req, _, _ = h.s.ask_status(True)
    h.s.flush()
    assert h.out() == [p.StatusRequest(req, True)]
    h.s.forget_status(req)
    assert h.welcome("d2", "j1") == []


# ---------------------------------------------------------------- liveness, on an injected clock


def test_a_silent_dispatcher_is_pinged_with_hello_then_given_up():
    h = Harness()
    [fut] = h.submit("a")
    h.s.tick(PING_S / 2)
    assert h.out() == []
    h.s.tick(PING_S)
    assert h.out() == [p.Hello(p.PROTOCOL_VERSION, "c1", "test")]
    h.s.tick(PING_S * 1.5)
    assert h.out() == []  # not pinged again so soon
    h.s.tick(TIMEOUT_S + 1)
    with pytest.raises(DispatcherUnavailable, match="no word from the dispatcher"):
        fut.result(0)


def test_silence_with_nothing_out_is_not_a_failure():
    h = Harness()
    h.s.tick(TIMEOUT_S * 10)
    assert h.out() == []
    [fut] = h.submit("a")
    h.s.tick(TIMEOUT_S * 10 + 1)  # heard was moved on while idle
    assert not fut.done()


def test_hearing_from_the_dispatcher_keeps_the_tasks():
    h = Harness()
    [fut] = h.submit("a")
    for now in range(1, int(TIMEOUT_S) * 2, 5):
        h.s.heard(float(now))
        h.s.tick(float(now))
    assert not fut.done()


# ---------------------------------------------------------------- inputs


def test_an_input_is_uploaded_once_and_dropped_when_its_last_task_is_over():
    h = Harness()
    digest = hashlib.sha256(b"data").hexdigest()
    a = h.queue("a", blobs={digest: "/data"})[0]
    b = h.queue("b", blobs={digest: "/data"})[0]
    h.s.flush()
    out = h.s.take_output()
    assert out.uploads == [(digest, f"/spool/{digest}")]
    assert [type(m) for m in out.messages] == [p.Submit]
    h.deliver(p.Results([done(a)]))
    assert h.out() == []
    assert h.deliver(p.Results([done(b)])) == [p.Ack([b.seq]), p.DropBlobs([digest])]
    h.queue("c", blobs={digest: "/data"})
    h.s.flush()
    assert h.s.take_output().uploads == [(digest, f"/spool/{digest}")]  # released, so sent again


def test_an_input_released_while_queueing_is_spooled_again():
    h = Harness()
    digest = hashlib.sha256(b"data").hexdigest()
    fut = TaskFuture(h, 1, PYTHON)
    fut.blobs = (digest,)
    h.s.add([(p.TaskSpec(1, PYTHON, b"", 3, 0.0), fut)], {digest: "/data"}, {}, lambda d, path: "/again")
    h.s.flush()
    assert h.s.take_output().uploads == [(digest, "/again")]


# ---------------------------------------------------------------- outputs fetched here


def test_a_result_with_an_output_is_held_until_the_file_is_written(tmp_path):
    h = Harness()
    data = b"output bytes"
    digest = hashlib.sha256(data).hexdigest()
    dest = str(tmp_path / "out.txt")
    [fut] = h.queue("a")
    fut.dests = {"out.txt": dest}
    h.s.flush()
    h.out()
    files = staging.encode_result_files([("out.txt", {"blob": digest, "size": len(data), "client": dest})])
    result = done(fut)._replace(files=files)
    assert h.deliver(p.Results([result])) == [p.GetBlob(digest, 0), p.Ack([fut.seq])]
    assert h.deliver(p.Results([result])) == [p.Ack([fut.seq])]  # a copy while fetching
    assert not fut.done()
    assert h.deliver(p.BlobData(digest, 0, len(data), data, "")) == [p.DropBlobs([digest])]
    assert fut.result(0) == 10 and fut.outputs == {"out.txt": dest}
    assert (tmp_path / "out.txt").read_bytes() == data


def test_an_output_the_task_did_not_ask_for_fails_it_and_is_released():
    h = Harness()
    [fut] = h.submit("a")
    digest = "ab" * 32
    files = staging.encode_result_files([("evil", {"blob": digest, "size": 1, "client": "/etc/passwd"})])
    out = h.deliver(p.Results([done(fut)._replace(files=files)]))
    assert p.DropBlobs([digest]) in out
    with pytest.raises(TaskError, match="did not ask for"):
        fut.result(0)


def test_a_stalled_fetch_is_asked_again_from_zero(tmp_path):
    h = Harness()
    digest = hashlib.sha256(b"x" * 10).hexdigest()
    [fut] = h.queue("a")
    fut.dests = {"o": str(tmp_path / "o")}
    h.s.flush()
    h.out()
    files = staging.encode_result_files([("o", {"blob": digest, "size": 10, "client": str(tmp_path / "o")})])
    h.deliver(p.Results([done(fut)._replace(files=files)]))
    [fut2] = h.submit("b")  # keeps the session busy: ticks look at the fetch
    h.s.heard(1000.0)
    h.s.tick(1000.0)
    assert p.GetBlob(digest, 0) in h.out()


def test_cf_wait_sees_cancellation_of_unsent_futures():
    h = Harness()
    [fut] = h.queue("a")
    h.s.cancel_unstarted()
    done_, _ = cf.wait([fut], timeout=0)
    assert done_ == {fut}


def test_the_outputs_of_a_task_given_up_here_are_released_when_its_result_comes():
    h = Harness()
    [fut] = h.submit("a")
    h.s.fail_all(RuntimeError("closed"))
    digest = "cd" * 32
    files = staging.encode_result_files([("o", {"blob": digest, "size": 1, "client": "/tmp/o"})])
    assert h.deliver(p.Results([done(fut)._replace(files=files)])) == [p.Ack([fut.seq]), p.DropBlobs([digest])]
    assert h.deliver(p.Results([done(fut)._replace(files=files)])) == [p.Ack([fut.seq])]  # released once
