"""The round trip's floor: falconet's four processes with no falconet code between them.

    python -m falconet.benchmarks.hops [N]

A client sends one small message at a time to a "dispatcher" (a ROUTER for clients and one
for executors, polled as the real one polls them), which hands it to an "executor" (a
DEALER that connects to it, so it could sit behind NAT), which writes it down a pipe to a
"slot" process and sends back what the slot writes back.  Each hop is one recv and one
send: the ZeroMQ TCP connections on loopback, the I/O threads, the pipes and the process
wake-ups of a falconet round trip, and nothing else.  `falconet bench` reports this next to
the latency of a real task, so the latency target can be read against what the machine
allows for this design.

The client here sends from its own thread; falconet's client hands each submit to an I/O
thread first, one hand-off more than this floor pays.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import zmq

_STOP = b"stop"


def _dispatcher() -> None:
    ctx = zmq.Context()
    clients, executors = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    client_port = clients.bind_to_random_port("tcp://127.0.0.1")
    executor_port = executors.bind_to_random_port("tcp://127.0.0.1")
    print(executor_port, flush=True)
    executor, _ = executors.recv_multipart()  # its hello
    print(client_port, flush=True)  # the client may start: the executor is known
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(executors, zmq.POLLIN)
    client = b""
    while True:
        ready = dict(poller.poll())
        if clients in ready:
            client, msg = clients.recv_multipart()
            executors.send_multipart([executor, msg])
            if msg == _STOP:
                return
        if executors in ready:
            _, msg = executors.recv_multipart()
            clients.send_multipart([client, msg])


def _executor(port: str) -> None:
    to_slot_r, to_slot_w = os.pipe()
    from_slot_r, from_slot_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the slot: echo what comes down the pipe
        while (msg := os.read(to_slot_r, 65536)) != _STOP:
            os.write(from_slot_w, msg)
        os._exit(0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(b"hello")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(from_slot_r, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if sock in ready:
            msg = sock.recv()
            os.write(to_slot_w, msg)
            if msg == _STOP:
                os.waitpid(pid, 0)
                return
        if from_slot_r in ready:
            sock.send(os.read(from_slot_r, 65536))


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-P", "-m", "falconet.benchmarks.hops", *args],
                            stdout=subprocess.PIPE, text=True)


def floor_latency(n: int = 2000, warmup: int = 200) -> dict:
    """n round trips of a 16-byte message through the four processes; milliseconds."""
    dispatcher = _start("dispatcher")
    executor = None
    try:
        executor_port = dispatcher.stdout.readline().strip()
        executor = _start("executor", executor_port)
        client_port = dispatcher.stdout.readline().strip()
        if not client_port:
            raise RuntimeError("the floor benchmark's dispatcher process failed to start")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)  # a hop that drops a message fails the run, not hangs it
        sock.connect(f"tcp://127.0.0.1:{client_port}")
        times = []
        clock = time.perf_counter
        for i in range(warmup + n):
            t0 = clock()
            sock.send(b"%016d" % i)
            sock.recv()
            times.append((clock() - t0) * 1000)
        sock.send(_STOP)
        sock.close()
        ctx.term()
    finally:
        for proc in (executor, dispatcher):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    times = sorted(times[warmup:])
    return {"p50_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99)], "tasks": n}


if __name__ == "__main__":
    if sys.argv[1:2] == ["dispatcher"]:
        _dispatcher()
    elif sys.argv[1:2] == ["executor"]:
        _executor(sys.argv[2])
    else:
        print(floor_latency(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
