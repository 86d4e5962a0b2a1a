"""Clients sharing one dispatcher, with real processes: a flood does not starve a small job,
a SIGKILLed client's queued work is cancelled, a client that stops reading is held back."""

from __future__ import annotations

import signal
import subprocess

import zmq
from cluster_helpers import dealer, wait_until

from falconet import protocol as p
from falconet import spawn
from falconet import tasks as tk

_FLOOD_CLIENT = """
import sys, falconet
client = falconet.Client(sys.argv[1], name="flood")
futures = client.submit_commands(["sleep 0.01"] * int(sys.argv[2]))
client.status()  # every batch accepted before we say so
print("submitted", flush=True)
sys.stdin.read()  # until killed
"""


def test_a_flood_of_one_client_does_not_starve_anothers_few_tasks(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("e1", 2)
    with cluster.client(name="flood") as flood, cluster.client(name="few") as few:
        wait_until(lambda: flood.status()["slots"] == 2, what="the executor")
        big = flood.submit_commands(["sleep 0.002"] * 5000)
        flood.status()  # accepted
        small = few.submit_commands(["true"] * 50)
        assert all(f.result(timeout=120).ok for f in small)
        left = flood.status()["client"]["pending"]
        assert left > 2500, f"the small job waited behind the flood ({left} of its tasks were left)"
        for f in big:
            f.cancel()


def test_the_queued_work_of_a_sigkilled_client_is_cancelled(cluster, tmp_path):
    cluster.start_dispatcher(extra=("--client-timeout", "2"))
    cluster.start_executor("e1", 2)
    proc = subprocess.Popen(spawn.code(_FLOOD_CLIENT, cluster.client_address, "4600"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"submitted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stdin.close()
    with cluster.client(name="after") as client:
        wait_until(lambda: client.status()["queued"] == 0, timeout_s=60, what="the dead client's queue to go")
        tasks = client.status()["tasks"]
        assert tasks["cancelled"] > 3000 and tasks["done"] + tasks["cancelled"] + tasks["running"] + \
            tasks["dispatched"] == 4600, tasks
        assert all(f.result(timeout=60).ok for f in client.submit_commands(["true"] * 200))
    assert "(--client-timeout 2)" in cluster.log("dispatcher")


def test_a_client_that_stops_reading_is_held_back_until_it_acknowledges(cluster):
    cluster.start_dispatcher(extra=("--max-unacked-mb", "1"))
    cluster.start_executor("e1", 2)
    ctx = zmq.Context()
    sock = dealer(ctx, cluster.client_address)
    try:
        sock.send(p.encode(p.Hello(p.PROTOCOL_VERSION, "raw", "reader")))
        body = tk.encode_command(["head", "-c", "4000", "/dev/zero"])  # 4 KB of output each
        specs = [p.TaskSpec(i, int(p.TaskKind.COMMAND), body, 0, 0.0) for i in range(600)]
        sock.send(p.encode(p.Submit(1, specs)))
        seqs: set[int] = set()

        def results_while_not_reading() -> bool:
            while sock.poll(100):
                msg = p.decode(sock.recv())
                if type(msg) is p.Results:
                    seqs.update(r.seq for r in msg.results)
            return "results it has not acknowledged" in cluster.log("dispatcher")
        wait_until(results_while_not_reading, timeout_s=120, what="the dispatcher to hold the client back")
        with cluster.client(name="status") as other:
            stalled = other.status()["queued"]
            assert stalled > 0
            wait_until(lambda: other.status()["busy"] == 0, what="the executor to go idle with work queued")
            assert other.status()["queued"] == stalled  # nothing of the held client runs
            assert all(f.result(timeout=60).ok for f in other.submit_commands(["true"] * 20))  # others run

            def reading() -> bool:  # now it reads and acknowledges, as a client does
                results_while_not_reading()
                sock.send(p.encode(p.Ack(sorted(seqs))))
                return len(seqs) == 600
            wait_until(reading, timeout_s=120, what="its tasks to go on once it reads")
    finally:
        sock.close(0)
        ctx.term()
