"""Dispatcher throughput, memory and scale, against the bare ZeroMQ ceiling of the same design.

    python benchmarks/dispatch.py          (or: python -m falconet.benchmarks.dispatch)

Functions (each starts and stops every process it needs and returns a dict of numbers):

    bare_zmq(n_records, executors, batch=256)  a plain pyzmq+msgpack ROUTER loop moving the
                                               same records, `batch` a message: the ceiling
    dispatch(n_tasks, executors, credit=64,    the real dispatcher, a bulk client, null executors
             needs=b"")                        (credit 64: Tasks of <= 64; compare with batch=64);
                                               needs: every task's requirements (falconet.needs)
    memory(n_tasks=1_000_000)                  dispatcher RSS per queued task
    scale(executors, n_tasks)                  1,000 to 54,000 registered, heartbeating executors

Processes: the dispatcher (``python -m falconet dispatcher``, or a ``python -c`` wrapper that
first raises RLIMIT_NOFILE), and helper processes that host many DEALER sockets each
(``_helper_main``), woken by epoll on the sockets' ZeroMQ descriptors: two, or for scale()
as many as file limits and ephemeral ports need, each connecting from its own 127.0.0.x.  The
bulk client (a raw DEALER speaking the client protocol) runs in the calling process.
This module imports no falconet code at the top, so the helpers load it by path and run
pyzmq and msgpack only.
Helpers stop when their stdin closes; the dispatcher gets SIGTERM and watches our pid.

Set FALCONET_BENCH_PYSPY=/some/prefix to attach py-spy to the dispatcher during each
measured phase; it writes collapsed stacks to /some/prefix-<phase>.txt.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import psutil
import zmq

from falconet import spawn

# Message tags and record layouts of falconet.protocol (PROTOCOL_VERSION 9), spelled out so
# the helper loops run without falconet code: the bytes on the wire are the same.  A batch of
# records travels column-wise: one array per field below, each as long as the batch.  Records:
#   TaskSpec   [seq, kind, body, retries, walltime_s, needs, files]                      (7)
#   Assignment [tid, attempt, kind, body, walltime_s, cpus, files]                      (7)
#   ExecResult [tid, attempt, state, output, reason, started, finished, files]          (8)
#   TaskResult [seq, state, output, reason, executor, attempts, submitted, started,
#               finished, files]                                                        (10)
# Messages: Register [20, version, executor_id, hostname, addresses, cpus, memory_mb, platform,
# slots, pid, facts, holding] (11 fields), Report [21, credit, started, results, stats] (4).
_HELLO, _SUBMIT, _STATUS_REQUEST, _ACK = 1, 2, 4, 7
_WELCOME, _ACCEPTED, _RESULTS, _STATUS_REPLY, _REFUSED, _HELLO_AGAIN, _STARTED = 10, 11, 12, 13, 14, 15, 16
_REGISTER, _REPORT = 20, 21
_REGISTERED, _TASKS, _REREGISTER, _HEARTBEAT = 30, 31, 33, 40
_VERSION = 9
_COMMAND, _DONE = 1, 3
_NO_RESULTS = [[]] * 8  # a Report's results without any: eight empty columns

_BODY = bytes(40)  # bare_zmq: an Assignment body of about the size of a small command's
_OUTPUT = msgpack.packb([0, b"", b"", False])  # a command's output: exit 0, no stdout/stderr
_HB = msgpack.packb([_HEARTBEAT])
# Helpers load this file by path: no falconet package is imported in their processes.
_HELPER = (
    "import importlib.util, sys; "
    f"spec = importlib.util.spec_from_file_location('falconet_bench_dispatch', {os.path.abspath(__file__)!r}); "
    "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m._helper_main(sys.argv[1:])"
)
_RAISED_NOFILE_MAIN = (
    "import resource, sys; s, h = resource.getrlimit(resource.RLIMIT_NOFILE); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (h, h)); sys.argv[0] = 'falconet'; "
    "from falconet.cli import main; main()"
)


def _check_protocol() -> None:
    """Fail loudly if falconet.protocol no longer matches the constants above."""
    from falconet import protocol as p

    m = p.MsgType
    ours = (_HELLO, _SUBMIT, _STATUS_REQUEST, _ACK, _WELCOME, _ACCEPTED, _RESULTS, _STATUS_REPLY, _REFUSED,
            _HELLO_AGAIN, _STARTED, _REGISTER, _REPORT, _REGISTERED, _TASKS, _REREGISTER, _HEARTBEAT, _VERSION,
            _COMMAND, _DONE)
    theirs = (m.HELLO, m.SUBMIT, m.STATUS_REQUEST, m.ACK, m.WELCOME, m.ACCEPTED, m.RESULTS, m.STATUS_REPLY, m.REFUSED,
              m.HELLO_AGAIN, m.STARTED, m.REGISTER, m.REPORT, m.REGISTERED, m.TASKS, m.REREGISTER, m.HEARTBEAT,
              p.PROTOCOL_VERSION, p.TaskKind.COMMAND, p.TaskState.DONE)
    layouts = (len(p.Register._names), len(p.Report._names), len(p.TaskSpec._fields), len(p.Assignment._fields),
               len(p.ExecResult._fields), len(p.TaskResult._fields))
    if ours != theirs or layouts != (11, 4, 7, 7, 8, 10):
        raise RuntimeError("benchmarks/dispatch.py speaks an older falconet protocol: update its constants")


def _raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


#: descriptors a process keeps besides one per executor connection (libzmq's own, stdio, the
#: client port, the listening sockets): what the dispatcher and each helper set aside
_FD_RESERVE = 256
#: connections bound to one source address: bind(addr:0) scans that address's ports in use,
#: so 9,750 from one address took 30 s to register where 2,500 each from eight took 5 s (and
#: net.ipv4.ip_local_port_range holds about 28,000 in all); loopback answers on all of
#: 127.0.0.0/8, so there are sources to spare
_PER_SOURCE = 2_000


def max_executors(nofile: int | None = None) -> int:
    """The most null executors scale() can register on a dispatcher whose hard RLIMIT_NOFILE
    is nofile (this process's, which the dispatcher inherits, when None): one descriptor each."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return max(0, nofile - _FD_RESERVE)


def _host_plan(executors: int, nofile: int, procs: int = 2) -> list[tuple[list[str], int]]:
    """(source addresses, executors) for each helper process: at least `procs` of them, more
    until each fits its file limit (a DEALER costs two descriptors, its connection and its
    ZeroMQ mailbox).  A helper of more than _PER_SOURCE connects from 127.<i + 1>.0.1, .2,
    ... (at most _PER_SOURCE each, all on loopback); a smaller one, as the system chooses
    (no sources), as on systems whose loopback answers on 127.0.0.1 alone."""
    per = max(1, (nofile - _FD_RESERVE) // 2)
    shares = _split(executors, max(procs, -(-executors // per)))
    if len(shares) > 254 or -(-max(shares) // _PER_SOURCE) > 254:
        raise ValueError(f"{executors} executors need more loopback source addresses than this plan has")
    return [([f"127.{i + 1}.0.{m + 1}" for m in range(-(-k // _PER_SOURCE))] if k > _PER_SOURCE else [], k)
            for i, k in enumerate(shares)]


def _from(source: str, address: str) -> str:
    """A ZeroMQ tcp:// address connected from this source address (any port)."""
    return address.replace("tcp://", f"tcp://{source}:0;", 1)


def _split(n: int, parts: int) -> list[int]:
    """n items in `parts` near-equal non-empty shares."""
    parts = max(1, min(parts, n))
    return [n // parts + (i < n % parts) for i in range(parts)]


# ============================================================== helper processes


def _helper_main(argv: list[str]) -> None:
    """Entry point of the helper processes: router | bare | null, with their arguments."""
    _raise_nofile()
    role, args = argv[0], argv[1:]
    if role == "router":
        _router(int(args[0]), int(args[1]), int(args[2]))
    elif role == "bare":
        _BarePeers(args[0], args[1], int(args[2]), int(args[3])).run()
    elif role == "null":
        _NullExecutors(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), int(args[5]),
                       [t for t in args[6].split(",") if t], [a for a in args[7].split(",") if a]).run()
    else:
        raise SystemExit(f"unknown helper role {role!r}")


def _say(*words: Any) -> None:
    print(*words, flush=True)


def _wait_go() -> None:
    """Block until the parent writes a line (or exits)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 64)
        if not chunk:
            raise SystemExit(0)
        data += chunk


def _assignments(first: int, k: int) -> list:
    """k Assignment columns for tids first.. (attempt 1, a small command's body)."""
    return [list(range(first, first + k)), [1] * k, [_COMMAND] * k, [_BODY] * k, [0.0] * k, [1] * k, [b""] * k]


def _done(tasks: list) -> list:
    """ExecResult columns answering Assignment columns: every task DONE now, with no output."""
    k, now = len(tasks[0]), time.time()
    return [tasks[0], tasks[1], [_DONE] * k, [_OUTPUT] * k, [""] * k, [now] * k, [now] * k, [b""] * k]


def _router(n: int, peers: int, batch: int) -> None:
    """bare_zmq's dispatcher: decode results, encode the next batch against the credit."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(opt, val)
    sock.bind("tcp://127.0.0.1:*")
    _say("addr", sock.getsockopt_string(zmq.LAST_ENDPOINT))
    recv, send, packb, unpackb = sock.recv_multipart, sock.send_multipart, msgpack.packb, msgpack.unpackb
    first = [recv() for _ in range(peers)]  # every peer's opening credit: start together
    t0 = time.perf_counter()
    sent = done = 0
    for peer, frame in first:
        k = min(unpackb(frame)[1], batch, n - sent)
        if k > 0:
            send([peer, packb([_TASKS, _assignments(sent, k)])])
            sent += k
    while done < n:
        peer, frame = recv()
        msg = unpackb(frame)  # [REPORT, credit, started, results, stats]
        done += len(msg[3][0])
        k = min(msg[1], batch, n - sent)
        if k > 0:
            send([peer, packb([_TASKS, _assignments(sent, k)])])
            sent += k
    _say("done", time.perf_counter() - t0, done)
    _say("stats", "")
    sock.close(0)
    ctx.term()


class _Dealers:
    """Many DEALER sockets in one thread, woken by epoll on their ZeroMQ descriptors."""

    def __init__(self, address: str, ids: list[bytes], sources: list[str] | None = None):
        """sources: local addresses the sockets connect from, in turn (none: the system's choice)."""
        self.address = address
        self.addresses = [_from(sources[i % len(sources)], address) for i in range(len(ids))] if sources else []
        self.ctx = zmq.Context()
        self.ctx.max_sockets = len(ids) + 64
        self.socks = []
        for rid in ids:
            s = self.ctx.socket(zmq.DEALER)
            for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.ROUTING_ID, rid)):
                s.setsockopt(opt, val)
            self.socks.append(s)
        self.recheck: list[zmq.Socket] = []  # sockets to look at on the next turn

    def begin(self) -> None:
        """Connect every socket and send its opening message (after go)."""
        for s in self.socks:
            s.connect(self.address)
            self.start(s)

    def start(self, s: zmq.Socket) -> None:
        """Send a socket's opening message (called once, after connecting)."""

    def handle(self, s: zmq.Socket, frame: bytes) -> None:
        """React to one frame that arrived on s."""

    def stats(self) -> str:
        return ""

    def run(self) -> None:
        """Say ready, wait for go, connect, serve until stdin closes, then print stats."""
        _say("ready", len(self.socks))
        _wait_go()
        ep = select.epoll()
        by_fd = {}
        for s in self.socks:
            fd = s.getsockopt(zmq.FD)
            by_fd[fd] = s
            ep.register(fd, select.EPOLLIN)
        ep.register(0, select.EPOLLIN)
        self.begin()
        events, pollin, noblock, handle = zmq.EVENTS, zmq.POLLIN, zmq.NOBLOCK, self.handle
        todo = self.socks
        try:
            while True:
                for s in todo:
                    # The descriptor only signals a message that arrives after EVENTS (or a
                    # recv) found the socket empty, and a send may consume its wake-up, so
                    # EVENTS is read after every handled frame and after every connect.
                    get, recv = s.getsockopt, s.recv
                    while get(events) & pollin:
                        handle(s, recv(noblock))
                todo, self.recheck = self.recheck, []
                for fd, _ in ep.poll(0 if todo else 1.0):
                    if fd == 0:
                        return
                    todo.append(by_fd[fd])
        finally:
            _say("stats", self.stats())
            for s in self.socks:
                s.close(0)
            self.ctx.term()


class _BarePeers(_Dealers):
    """bare_zmq's peers: ask for `batch` records, answer each batch with its results."""

    def __init__(self, address: str, prefix: str, count: int, batch: int):
        super().__init__(address, [f"{prefix}-{i}".encode() for i in range(count)])
        self.request = msgpack.packb([_REPORT, batch, [], _NO_RESULTS, {}])
        self.packb, self.unpackb = msgpack.packb, msgpack.unpackb

    def start(self, s: zmq.Socket) -> None:
        s.send(self.request)

    def handle(self, s: zmq.Socket, frame: bytes) -> None:
        tasks = self.unpackb(frame)[1]
        s.send(self.packb([_REPORT, len(tasks[0]), [], _done(tasks), {}]))


class _NullExecutors(_Dealers):
    """Executors that run nothing: every task is DONE at once, credit handed straight back.

    Each registers `slots` = credit, `cpus` cpus (credit when 0), 1 GiB of memory, this
    host's architecture and `tags` in facts["tags"].  With window > 0 at most that many
    sockets are connected and not yet registered at a time (a paced start); 0 connects them
    all at once (a connection storm).  Sockets connect from `sources` in turn, if any.
    """

    def __init__(self, address: str, prefix: str, count: int, credit: int, window: int = 0, cpus: int = 0,
                 tags: list[str] | None = None, sources: list[str] | None = None):
        self.ids = [f"{prefix}-{i}" for i in range(count)]
        super().__init__(address, [i.encode() for i in self.ids], sources)
        self.credit, self.window = credit, window
        self.unconnected = list(zip(self.socks, self.addresses or [address] * count))[::-1]
        facts = {"arch": platform.machine(), "tags": list(tags or [])}
        self.register = {
            s: msgpack.packb([_REGISTER, _VERSION, eid, "bench-host", ["127.0.0.1"], cpus or credit, 1024,
                              "linux", credit, os.getpid(), facts, []])
            for s, eid in zip(self.socks, self.ids)
        }
        self.first_credit = msgpack.packb([_REPORT, credit, [], _NO_RESULTS, {}])
        self.packb, self.unpackb = msgpack.packb, msgpack.unpackb
        self.done = self.messages = self.heartbeats = self.registered = self.reregistered = 0

    def begin(self) -> None:
        for _ in range(self.window or len(self.socks)):
            self._connect_next()

    def _connect_next(self) -> None:
        if self.unconnected:
            s, address = self.unconnected.pop()
            s.connect(address)
            s.send(self.register[s])
            self.recheck.append(s)

    def handle(self, s: zmq.Socket, frame: bytes) -> None:
        msg = self.unpackb(frame)
        kind = msg[0]
        if kind == _TASKS:
            tasks = msg[1]
            s.send(self.packb([_REPORT, len(tasks[0]), [], _done(tasks), {}]))
            self.done += len(tasks[0])
            self.messages += 1
        elif kind == _HEARTBEAT:
            s.send(_HB)
            self.heartbeats += 1
        elif kind == _REGISTERED:
            s.send(self.first_credit)
            self.registered += 1
            if self.window:
                self._connect_next()
        elif kind == _REREGISTER:
            self.reregistered += 1
            s.send(self.register[s])
        elif kind == _REFUSED:
            _say("refused", msg[1])

    def stats(self) -> str:
        return (f"done={self.done} messages={self.messages} heartbeats={self.heartbeats} registered={self.registered} "
                f"reregistered={self.reregistered}")


# ============================================================== the calling process's side


class _Helpers:
    """Helper processes of one role; each says ready, waits for go, stops on stdin EOF."""

    def __init__(self, role: str, argvs: list[list[Any]], ready: str = "ready", timeout: float = 60.0):
        self.procs: list[subprocess.Popen] = []
        self.stats: list[str] = []
        try:
            for argv in argvs:
                self.procs.append(subprocess.Popen(
                    spawn.code(_HELPER, role, *map(str, argv)),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0))
            self.ready = [_expect(proc, ready, timeout) for proc in self.procs]
        except BaseException:
            self.close()
            raise

    def go(self) -> None:
        for proc in self.procs:
            proc.stdin.write(b"go\n")

    def close(self) -> list[str]:
        """Stop every helper; return their stats lines."""
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                self.stats.append(_expect(proc, "stats", 15.0).partition(" ")[2])
            except (TimeoutError, EOFError):
                proc.kill()
            _reap(proc)
        self.procs = []
        return self.stats


def _reap(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of an unbuffered child stdout, or TimeoutError / EOFError."""
    fd, line, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no line from pid {proc.pid} within {timeout}s (got {line!r})")
        c = os.read(fd, 1)
        if not c:
            raise EOFError(f"pid {proc.pid} exited (status {proc.poll()}) after {line!r}")
        line += c
    return line.decode().rstrip("\n")


def _expect(proc: subprocess.Popen, word: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        line = _readline(proc, max(0.0, deadline - time.monotonic()))
        if line.split(" ", 1)[0] == word:
            return line


class _Dispatcher:
    """A real falconet dispatcher process on loopback with ephemeral ports."""

    def __init__(self, *options: str, raise_nofile: bool = False):
        _check_protocol()
        head = spawn.code(_RAISED_NOFILE_MAIN) if raise_nofile else spawn.falconet()
        cmd = [*head, "dispatcher", "--host", "127.0.0.1", "--client-port", "0", "--executor-port", "0",
               "--log-level", "warning", "--parent-pid", str(os.getpid()), *options]
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 (kept open for the process's life, closed in close())
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.err, bufsize=0, start_new_session=True)
        try:
            self.client_address = _expect(self.proc, "client:", 30).split()[1]
            self.executor_address = _expect(self.proc, "executor:", 30).split()[1]
            self.http_url = _expect(self.proc, "http:", 30).split()[1] if "--http-port" in options else ""
            self.ps = psutil.Process(self.proc.pid)
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def profiled(self, phase: str) -> Iterator[None]:
        """py-spy on the dispatcher for the duration, when FALCONET_BENCH_PYSPY names a prefix."""
        prefix = os.environ.get("FALCONET_BENCH_PYSPY")
        if not prefix:
            yield
            return
        exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
        spy = subprocess.Popen([exe if os.path.exists(exe) else "py-spy", "record", "--pid", str(self.proc.pid),
                                "--rate", "200", "--nonblocking", "--format", "raw",
                                "--output", f"{prefix}-{phase}.txt"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            _reap(spy, 30.0)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def close(self) -> str:
        """Stop the dispatcher; return its stderr (warnings and errors only)."""
        if self.err.closed:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _reap(self.proc, 30.0)
        self.err.seek(0)
        text = self.err.read().decode(errors="replace")
        self.err.close()
        if text.strip():
            sys.stderr.write("".join(f"[dispatcher] {ln}\n" for ln in text.splitlines()[-20:]))
        return text

    def __enter__(self) -> _Dispatcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Client:
    """A bulk client: a raw DEALER speaking the client protocol, without futures."""

    def __init__(self, address: str, client_id: str = "bench-client"):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.ROUTING_ID, client_id.encode())):
            self.sock.setsockopt(opt, val)
        self.sock.connect(address)
        self.results = self.accepted = self.req = self.next_seq = self.next_batch = 0
        self.sock.send(msgpack.packb([_HELLO, _VERSION, client_id, "falconet-bench"]))
        self.limits = self._until(lambda k, m: k == _WELCOME, 30.0)[3]

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def _recv(self, timeout: float) -> bytes:
        if not self.sock.poll(timeout * 1000):
            raise TimeoutError(f"nothing from the dispatcher in {timeout:.0f}s "
                               f"({self.results} results, {self.accepted} accepted)")
        frame = self.sock.recv()
        kind = frame[1]  # [type, ...]: a fixarray header, then the type as a positive fixint
        if kind == _RESULTS:  # acknowledged, as every client does, so the dispatcher forgets them
            seqs = msgpack.unpackb(frame)[1][0]  # TaskResult columns; seqs first
            self.results += len(seqs)
            self.sock.send(msgpack.packb([_ACK, seqs]))
        elif kind == _ACCEPTED:
            self.accepted += msgpack.unpackb(frame)[2]
        elif kind in (_REFUSED, _HELLO_AGAIN):  # this client never outlives its dispatcher
            raise RuntimeError(f"the dispatcher refused: {msgpack.unpackb(frame)[1]}")
        return frame

    def _until(self, done: Any, timeout: float) -> list:
        """Receive (counting results) until done(kind, message) holds; return the message."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._recv(max(0.01, deadline - time.monotonic()))
            if frame[1] in (_RESULTS, _ACCEPTED, _STARTED):
                continue
            msg = msgpack.unpackb(frame)
            if done(msg[0], msg):
                return msg

    def status(self) -> dict:
        self.req += 1
        req = self.req
        self.sock.send(msgpack.packb([_STATUS_REQUEST, req, False]))
        return self._until(lambda k, m: k == _STATUS_REPLY and m[1] == req, 30.0)[2]

    def wait_executors(self, n: int, timeout: float, every: float = 0.05) -> float:
        """Seconds until the dispatcher counts n registered executors."""
        t0 = time.perf_counter()
        while (got := self.status()["executors"]) < n:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{got} of {n} executors registered after {timeout}s")
            time.sleep(every)
        return time.perf_counter() - t0

    def submit_all(self, frames: list[bytes]) -> None:
        for f in frames:
            self.sock.send(f)

    def wait_results(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.results < n:
            self._recv(max(0.01, deadline - time.monotonic()))

    def wait_accepted(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.accepted < n:
            self._recv(max(0.01, deadline - time.monotonic()))

    def submit_paced(self, frames: list[bytes], sizes: list[int], window: int, timeout: float) -> None:
        """Submit with at most `window` Submits unaccepted, so few wait in ZeroMQ buffers."""
        base, sent = self.accepted, 0
        for i, f in enumerate(frames):
            self.wait_accepted(base + sum(sizes[:max(0, i - window + 1)]), timeout)
            self.sock.send(f)
            sent += sizes[i]
        self.wait_accepted(base + sent, timeout)


def _array_len(frame: bytes, at: int) -> int:
    """Length of the msgpack array whose header starts at frame[at]."""
    h = frame[at]
    if 0x90 <= h <= 0x9F:
        return h & 0x0F
    if h == 0xDC:
        return int.from_bytes(frame[at + 1:at + 3], "big")
    if h == 0xDD:
        return int.from_bytes(frame[at + 1:at + 5], "big")
    raise ValueError(f"not an array header: {h:#x}")


def _submit_frames(n: int, per_message: int = 10_000, first_seq: int = 0, first_batch: int = 0,
                   needs: bytes = b"") -> list[bytes]:
    """Submit messages for n `/bin/true` command tasks with these needs (b"": plain tasks),
    encoded ahead of the clock."""
    from falconet.tasks import encode_command

    body = encode_command("/bin/true")
    end = first_seq + n
    frames = []
    for b, start in enumerate(range(first_seq, end, per_message)):
        k = min(end, start + per_message) - start
        columns = [list(range(start, start + k)), [_COMMAND] * k, [body] * k, [0] * k, [0.0] * k, [needs] * k, [b""] * k]
        frames.append(msgpack.packb([_SUBMIT, first_batch + b, columns]))
    return frames


def _null_hosts(address: str, executors: int, credit: int, procs: int, window: int = 0, cpus: int = 0,
                tags: tuple[str, ...] = (), spread: bool = False) -> _Helpers:
    """Helper processes hosting the null executors, `procs` of them; with `spread`, as many
    more as their file limits and source ports need (_host_plan), each from its own address."""
    plan = _host_plan(executors, _raise_nofile(), procs) if spread else [([], k) for k in _split(executors, procs)]
    return _Helpers("null", [[address, f"null{i}", k, credit, window, cpus, ",".join(tags), ",".join(sources)]
                             for i, (sources, k) in enumerate(plan)])


def _stats(lines: list[str]) -> dict[str, int]:
    """Sum the helpers' "key=value ..." stats lines."""
    out: dict[str, int] = {}
    for line in lines:
        for kv in line.split():
            k, _, v = kv.partition("=")
            out[k] = out.get(k, 0) + int(v)
    return out


def _run_tasks(client: _Client, disp: _Dispatcher, n_tasks: int, phase: str, timeout: float = 120.0,
               needs: bytes = b"") -> dict:
    """Submit n_tasks at once and count results; time and dispatcher CPU in between."""
    frames = _submit_frames(n_tasks, first_seq=client.next_seq, first_batch=client.next_batch, needs=needs)
    client.next_seq += n_tasks
    client.next_batch += len(frames)
    base, done0 = client.results, client.status()["tasks"]["done"]
    with disp.profiled(phase):
        cpu0, t0 = disp.cpu(), time.perf_counter()
        client.submit_all(frames)
        client.wait_results(base + n_tasks, timeout)
        elapsed = time.perf_counter() - t0
        cpu = disp.cpu() - cpu0
    done = client.status()["tasks"]["done"] - done0
    if done != n_tasks:
        raise RuntimeError(f"{done} of {n_tasks} tasks are done")
    return {"tasks_per_s": n_tasks / elapsed, "dispatcher_cpu_s": cpu, "elapsed_s": elapsed}


# ============================================================== the benchmarks


def bare_zmq(n_records: int, executors: int, batch: int = 256, procs: int = 2) -> dict:
    """The ceiling of this design: a plain pyzmq+msgpack ROUTER loop, no falconet code.

    A router process and `executors` DEALER peers (in `procs` <= 2 processes) move
    Assignment-like 7-field records out and ExecResult-like 8-field records back, column-wise
    and msgpack-framed exactly as falconet's Tasks and Report, `batch` records per message
    against the peers' credit.
    Timed in the router from the first batch (every peer has asked) to the last result.
    """
    router = _Helpers("router", [[n_records, executors, batch]], ready="addr")
    peers = None
    try:
        address = router.ready[0].split()[1]
        shares = _split(executors, min(procs, 2))
        peers = _Helpers("bare", [[address, f"bare{i}", k, batch] for i, k in enumerate(shares)])
        peers.go()
        words = _expect(router.procs[0], "done", 120).split()
        return {"records_per_s": n_records / float(words[1]), "elapsed_s": float(words[1])}
    finally:
        if peers is not None:
            peers.close()
        router.close()


def dispatch(n_tasks: int, executors: int, credit: int = 64, procs: int = 2, journal: bool = False,
             needs: bytes = b"", cpus: int = 0, tags: tuple[str, ...] = ("gpu",), events: bool = True,
             watched: bool = False) -> dict:
    """Throughput of the real dispatcher: a bulk client, `executors` null executors.

    The client submits n_tasks `/bin/true` commands in Submit messages of 10,000 and counts
    (and acknowledges) Results; the null executors (credit `credit` each, in `procs` <= 2
    processes) answer every Tasks at once with DONE results and the credit it consumed.
    Timed from the first Submit to the last Result; dispatcher CPU (psutil) over the same
    span.  With `journal`, the dispatcher keeps its journal in a fresh temporary directory
    (on the same disk as the system's temporary files): every turn is written and fdatasynced.

    `needs` is every task's TaskSpec.needs (falconet.needs.encode): b"" puts them on the
    dispatcher's plain fast path, anything else through requirement matching (a needs class,
    the executors that satisfy it, best fit by free cpus).  Every null executor registers
    the same whatever the needs: `cpus` cpus (0: as many as its credit), 1 GiB, this host's
    arch and facts["tags"] = `tags`.  With cpus = credit a task needing one cpu is limited by
    credit alone (a null executor answers at once, so it never holds more than its credit);
    a task needing c cpus by free cpus: at most credit / c of them in flight per executor.

    `events` False starts the dispatcher with --event-history 0 (no task events recorded);
    `watched` serves HTTP and runs a watcher process for the whole run: it scrapes /metrics
    every 100 ms and fetches /api/dashboard every second, as Prometheus and an open
    dashboard page do.
    """
    with tempfile.TemporaryDirectory(prefix="falconet-bench-journal-") as state:
        options = ("--state-dir", state) if journal else ()
        options += () if events else ("--event-history", "0")
        options += ("--http-port", "0") if watched else ()
        with _Cluster(executors, credit, min(procs, 2), *options, cpus=cpus, tags=tags) as c, \
                _watcher(c.disp.http_url) as scrapes:
            c.client.wait_executors(executors, 60.0)
            time.sleep(0.2)  # let the opening credit reports land
            run = _run_tasks(c.client, c.disp, n_tasks, f"dispatch-{executors}{'-journal' * journal}"
                             f"{'-needs-' + needs.hex() if needs else ''}", needs=needs)
            journal_bytes = c.client.status().get("journal", {}).get("journal_bytes", 0)
    return {**run, "tasks_per_message": n_tasks / max(1, _stats(c.stats).get("messages", 0)),
            "journal_bytes": journal_bytes, "scrapes": scrapes.get("scrapes", 0)}


_WATCHER_MAIN = """
import sys, time, urllib.request
url = sys.argv[1]
n, next_page = 0, 0.0
while True:
    urllib.request.urlopen(url + "/metrics", timeout=10).read()
    n += 1
    if time.monotonic() >= next_page:
        urllib.request.urlopen(url + "/api/dashboard", timeout=10).read()
        next_page = time.monotonic() + 1.0
    print(n, flush=True)
    time.sleep(0.1)
"""


@contextlib.contextmanager
def _watcher(url: str) -> Iterator[dict]:
    """A process polling url's /metrics every 100 ms and /api/dashboard every second (nothing
    without a url); the dict it yields gets the number of scrapes when the block ends."""
    out: dict = {}
    if not url:
        yield out
        return
    proc = subprocess.Popen(spawn.code(_WATCHER_MAIN, url), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield out
    finally:
        proc.kill()
        lines = proc.stdout.read().split()
        proc.wait()
        out["scrapes"] = int(lines[-1]) if lines else 0


class _Cluster:
    """A dispatcher, a bulk client and null executors; stops the dispatcher first."""

    def __init__(self, executors: int, credit: int, procs: int, *options: str,
                 raise_nofile: bool = False, window: int = 0, cpus: int = 0, tags: tuple[str, ...] = ()):
        """With raise_nofile the dispatcher gets its hard file limit and the executors as many
        helpers, each from its own loopback address, as file limits and ports need."""
        self.disp = _Dispatcher(*options, raise_nofile=raise_nofile)
        self.client = self.hosts = None
        self.stats: list[str] = []
        try:
            self.client = _Client(self.disp.client_address)
            self.hosts = _null_hosts(self.disp.executor_address, executors, credit, procs, window, cpus, tags,
                                     spread=raise_nofile)
            self.rss_before = self.disp.rss()  #: the dispatcher's, before any executor connects
            self.hosts.go()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.disp.close()  # first, or it logs every executor that leaves as lost
        if self.client is not None:
            self.client.close()
        if self.hosts is not None:
            self.stats = self.hosts.close()

    def __enter__(self) -> _Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def memory(n_tasks: int = 1_000_000) -> dict:
    """Dispatcher RSS per queued task: n small `/bin/true` commands queued, no executors.

    Submits of 10,000 go out two at a time (each waits for the Accepted of the one before
    the last), so the RSS measured holds the queue rather than ZeroMQ receive buffers the
    allocator has not given back.
    """
    frames = _submit_frames(n_tasks, 10_000)
    sizes = [min(10_000, n_tasks - start) for start in range(0, n_tasks, 10_000)]
    with _Dispatcher() as disp:
        client = _Client(disp.client_address)
        try:
            client.status()
            before = disp.rss()
            with disp.profiled("memory"):
                client.submit_paced(frames, sizes, 2, 120.0)
            after = disp.rss()
            queued = client.status()["queued"]
        finally:
            client.close()
    if queued != n_tasks:
        raise RuntimeError(f"{queued} of {n_tasks} tasks queued")
    return {"bytes_per_task": (after - before) / n_tasks, "rss_before": before, "rss_after": after}


def scale(executors: int, n_tasks: int, credit: int = 64, idle_s: float = 3.0, window: int = 64,
          runs: int = 3) -> dict:
    """Many registered, heartbeating executors: registration time, memory, idle cost, throughput.

    The dispatcher runs with --heartbeat-interval 1 --heartbeat-timeout 30 and its file limit
    raised to the hard limit, which must leave a descriptor per executor (max_executors());
    the null executors live in helper processes, two or as many more as their file limits
    and ephemeral ports need, each connecting from its own loopback address (_host_plan).
    Each process keeps at most `window` executors connecting-but-unregistered; window=0
    connects all at once, a storm that overflows the dispatcher's listen backlog and leaves
    the dropped SYNs to TCP's 1, 2, 4, 8, 16 s retries.  registered_s runs from the go
    signal (sockets created, not connected) until StatusRequest counts them all;
    bytes_per_executor is the dispatcher's RSS growth from before go to a second after that,
    per executor; idle_cpu_per_s is dispatcher CPU seconds per wall second over `idle_s`
    with every executor registered and idle (answering heartbeats); then n_tasks run as in
    dispatch(), `runs` times on the same executors: tasks_per_s is their median (a run of
    100,000 tasks lasts about a second, and a heartbeat round falling inside it or not moves
    it by a third), with the min and max beside it.
    """
    if executors > max_executors():
        raise RuntimeError(f"{executors:,} executors need {executors + _FD_RESERVE:,} descriptors in the dispatcher, "
                           f"and the hard RLIMIT_NOFILE here is {max_executors() + _FD_RESERVE:,}: raise it "
                           "(ulimit -Hn, /etc/security/limits.conf, LimitNOFILE=) or run fewer")
    opts = ("--heartbeat-interval", "1", "--heartbeat-timeout", "30")
    with _Cluster(executors, credit, 2, *opts, raise_nofile=True, window=window) as c:
        t0 = time.perf_counter()  # the helpers got go just before: a few ms early at most
        c.client.wait_executors(executors, max(90.0, executors / 250), every=0.1)
        registered_s = time.perf_counter() - t0
        time.sleep(1.0)  # the opening credit reports land; heartbeats settle into their rhythm
        rss = c.disp.rss()
        with c.disp.profiled(f"scale-{executors}-idle"):
            cpu0, w0 = c.disp.cpu(), time.perf_counter()
            time.sleep(idle_s)
            idle = (c.disp.cpu() - cpu0) / (time.perf_counter() - w0)
        rs = [_run_tasks(c.client, c.disp, n_tasks, f"scale-{executors}-{i}") for i in range(runs)]
        info = c.client.status()
    if info["executors"] != executors or info["lost_executors"]:
        raise RuntimeError(f"executors {info['executors']}, lost {info['lost_executors']}; helpers: {c.stats}")
    mid = sorted(rs, key=lambda r: r["tasks_per_s"])[len(rs) // 2]
    return {"executors": executors, "registered_s": registered_s, "tasks_per_s": mid["tasks_per_s"],
            "tasks_per_s_min": min(r["tasks_per_s"] for r in rs),
            "tasks_per_s_max": max(r["tasks_per_s"] for r in rs),
            "bytes_per_executor": (rss - c.rss_before) / executors, "helpers": len(c.stats),
            "idle_cpu_per_s": idle, "dispatcher_cpu_s": mid["dispatcher_cpu_s"],
            "tasks_per_message": runs * n_tasks / max(1, _stats(c.stats).get("messages", 0))}


def _demo() -> None:
    def show(fn: Any, *args: Any, **kw: Any) -> dict:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        call = ", ".join([f"{a:_}" for a in args] + [f"{k}={v}" for k, v in kw.items()])
        nums = ", ".join(f"{k}={v:,.3f}" if isinstance(v, float) else f"{k}={v:,}" for k, v in out.items())
        print(f"{fn.__name__}({call}): {nums}  [{time.perf_counter() - t0:.1f}s]", flush=True)
        return out

    bare = {b: show(bare_zmq, 1_000_000, 10, b) for b in (256, 64)}
    runs = {n: show(dispatch, 200_000, n) for n in (1, 10, 100)}
    for b, r in bare.items():
        print(f"dispatch(10) / bare_zmq(10, batch={b}): {runs[10]['tasks_per_s'] / r['records_per_s']:.2f}")
    show(memory, 1_000_000)
    for n, kw in ((1_000, {}), (10_000, {}), (10_000, {"window": 0})):
        s = show(scale, n, 100_000, **kw)
        print(f"scale({n}) / dispatch(10): {s['tasks_per_s'] / runs[10]['tasks_per_s']:.2f}")


if __name__ == "__main__":
    _demo()
