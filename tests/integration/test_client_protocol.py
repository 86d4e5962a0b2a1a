"""The client's side of the protocol against a scripted dispatcher on a loopback ROUTER socket.

The script plays what is hard to cause with the real dispatcher: a Results message lost with
a broken connection, a restart from a journal, copies of results.
"""

from __future__ import annotations

import threading

import pytest
import zmq

import falconet
from falconet import protocol as p
from falconet import tasks


class Script:
    """A ROUTER socket that answers as a dispatcher would, message by message."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout_s: float = 10.0):
        assert self.sock.poll(timeout_s * 1000), "the client sent nothing"
        peer, frame = self.sock.recv_multipart()
        return peer, p.decode(frame)

    def expect(self, kind, timeout_s: float = 10.0):
        """The next message of this kind, skipping Acks and pings of other kinds."""
        while True:
            peer, msg = self.recv(timeout_s)
            if type(msg) is kind:
                return peer, msg

    def send(self, peer, msg):
        self.sock.send_multipart([peer, p.encode(msg)])

    def welcome(self, peer, dispatcher_id: str, journal_id: str):
        self.send(peer, p.Welcome(p.PROTOCOL_VERSION, dispatcher_id,
                                  {"journal": bool(journal_id), "journal_id": journal_id}))

    def restart(self, peer, dispatcher_id: str, journal_id: str):
        """Play a restarted dispatcher: ask the client to say Hello again, then welcome it."""
        self.send(peer, p.HelloAgain("this dispatcher does not know this client"))
        self.expect(p.Hello)
        self.welcome(peer, dispatcher_id, journal_id)

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def script():
    s = Script()
    yield s
    s.close()


def command_result(seq: int, out: bytes) -> p.TaskResult:
    return p.TaskResult(seq, int(p.TaskState.DONE), tasks.encode_command_output(0, out, b"", False), "", "ex", 1,
                        0.0, 0.0, 0.0)


def connect(script: Script, journal: bool) -> tuple[falconet.Client, bytes]:
    """A Client connected to the script, welcomed by dispatcher "d1"."""
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("client", falconet.Client(script.address)))
    t.start()
    peer, _ = script.expect(p.Hello)
    script.welcome(peer, "d1", "j1" if journal else "")
    t.join()
    return box["client"], peer


def test_a_silent_dispatcher_is_greeted_again_and_a_lost_result_comes_back_once(script):
    client, peer = connect(script, journal=True)
    try:
        fut = client.submit_command("echo one")
        _, submit = script.expect(p.Submit)
        script.send(peer, p.Accepted(submit.batch, 1))
        # The Results message is "lost": nothing is sent.  After two silent seconds the
        # client says Hello again, and the dispatcher sends what was never acknowledged.
        _, again = script.expect(p.Hello, timeout_s=10)
        assert again.client_id == client.id
        script.welcome(peer, "d1", "j1")
        script.send(peer, p.Results([command_result(1, b"one\n")]))
        script.send(peer, p.Results([command_result(1, b"copy\n")]))  # a copy: ignored
        assert fut.result(timeout=10).stdout == "one\n"
        _, ack = script.expect(p.Ack)
        assert set(ack.seqs) == {1}  # copies are acknowledged too, so the dispatcher forgets them
    finally:
        client.close()


def test_after_a_journaled_restart_unaccepted_batches_are_sent_again_with_their_numbers(script):
    client, peer = connect(script, journal=True)
    try:
        first = client.submit_command("echo a")
        _, s1 = script.expect(p.Submit)
        script.send(peer, p.Accepted(s1.batch, 1))
        second = client.submit_command("echo b")
        _, s2 = script.expect(p.Submit)  # never accepted: the dispatcher died
        script.restart(peer, "d2", "j1")
        _, resent = script.expect(p.Submit)
        assert resent == s2  # same batch number, same tasks; the accepted one is not re-sent
        script.send(peer, p.Accepted(resent.batch, 1))
        script.send(peer, p.Results([command_result(1, b"a\n"), command_result(2, b"b\n")]))
        assert first.result(timeout=10).stdout == "a\n" and second.result(timeout=10).stdout == "b\n"
    finally:
        client.close()


def test_after_a_restart_without_a_journal_the_unfinished_futures_fail(script):
    client, peer = connect(script, journal=False)
    try:
        fut = client.submit_command("echo a")
        script.expect(p.Submit)
        script.restart(peer, "d2", "")
        with pytest.raises(falconet.DispatcherUnavailable, match="without a journal"):
            fut.result(timeout=10)
    finally:
        client.close()


def test_a_submit_lost_with_a_broken_connection_is_sent_again_after_the_next_welcome(script):
    client, peer = connect(script, journal=False)
    try:
        fut = client.submit_command("echo lost")
        _, lost = script.expect(p.Submit)  # "lost": no Accepted
        _, hello = script.expect(p.Hello)  # the liveness probe, after two silent seconds
        script.welcome(peer, "d1", "")
        _, again = script.expect(p.Submit)
        assert again == lost
        script.send(peer, p.Accepted(again.batch, 1))
        script.send(peer, p.Results([command_result(1, b"lost\n")]))
        assert fut.result(timeout=10).stdout == "lost\n"
    finally:
        client.close()


def test_a_restart_with_another_journal_fails_the_unfinished_futures(script):
    client, peer = connect(script, journal=True)
    try:
        fut = client.submit_command("echo a")
        _, s1 = script.expect(p.Submit)
        script.send(peer, p.Accepted(s1.batch, 1))
        script.restart(peer, "d2", "another")
        with pytest.raises(falconet.DispatcherUnavailable, match="another journal"):
            fut.result(timeout=10)
    finally:
        client.close()


# ---------------------------------------------------------------- staged outputs


def _output_result(seq: int, name: str, digest: str, size: int, client_path: str) -> p.TaskResult:
    from falconet import staging

    files = staging.encode_result_files([(name, {"blob": digest, "size": size, "client": client_path})])
    return command_result(seq, b"")._replace(files=files)


def test_an_output_is_written_where_the_task_asked_never_where_the_result_says(script, tmp_path):
    import hashlib

    client, peer = connect(script, journal=False)
    try:
        fut = client.submit_command("true", outputs=[("out.txt", str(tmp_path / "mine.txt"))])
        script.expect(p.Submit)
        data = b"hello"
        digest = hashlib.sha256(data).hexdigest()
        elsewhere = tmp_path / "not-yours.txt"
        script.send(peer, p.Results([_output_result(1, "other.txt", digest, 5, str(elsewhere))]))
        with pytest.raises(falconet.TaskError, match="did not ask for"):
            fut.result(timeout=10)
        assert not elsewhere.exists()
        _, drop = script.expect(p.DropBlobs)
        assert drop.digests == [digest], "the stray output is released, not fetched"
    finally:
        client.close()


def test_a_result_sent_again_during_its_fetch_waits_for_the_file(script, tmp_path):
    import hashlib

    client, peer = connect(script, journal=False)
    try:
        dest = tmp_path / "out.txt"
        fut = client.submit_command("true", outputs=[("out.txt", str(dest))])
        script.expect(p.Submit)
        data = b"x" * 3000
        digest = hashlib.sha256(data).hexdigest()
        result = _output_result(1, "out.txt", digest, len(data), "/ignored")
        script.send(peer, p.Results([result]))
        _, get = script.expect(p.GetBlob)
        assert (get.digest, get.offset) == (digest, 0)
        script.send(peer, p.Results([result]))  # a copy, as after a Hello
        script.send(peer, p.BlobData(digest, 0, len(data), data[:1000], ""))
        assert not fut.done(), "resolved before its output was written"
        script.send(peer, p.BlobData(digest, 500, len(data), data[500:1500], ""))  # stale: ignored
        script.send(peer, p.BlobData(digest, 1000, len(data), data[1000:], ""))
        assert fut.result(timeout=10).outputs == {"out.txt": str(dest)}
        assert dest.read_bytes() == data
        _, drop = script.expect(p.DropBlobs)
        assert drop.digests == [digest]
    finally:
        client.close()
