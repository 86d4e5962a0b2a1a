"""Properties of matching and packing over random fleets, workloads and event orders.

* A task with needs is only ever held by an executor that satisfies them, and the tasks
  with needs an executor holds never add up to more cpus or memory than it has.
* In a finite run where executors keep finishing what they hold, every task some executor
  satisfies is dispatched and finished, whatever small tasks keep arriving; the others
  stay queued and are reported unschedulable.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import needs as nd
from falconet import protocol as p
from falconet.dispatcher.core import Config, Core

DONE = int(p.TaskState.DONE)
TAGS = ["gpu", "ssd", "site=cloud"]

executors = st.lists(st.fixed_dictionaries({
    "cpus": st.integers(1, 8), "memory_mb": st.sampled_from([1000, 4000, 16000]),
    "tags": st.lists(st.sampled_from(TAGS[:2]), unique=True, max_size=2),
    "cloud": st.booleans(), "arch": st.sampled_from(["x86_64", "arm64"]),
}), min_size=1, max_size=4)

needs = st.one_of(
    st.just(nd.PLAIN),
    st.builds(nd.make, cpus=st.integers(1, 10), memory=st.sampled_from([0, 2000, 8000, 20000]),
              arch=st.sampled_from(["", "x86_64", "arm64"]),
              tags=st.lists(st.sampled_from(TAGS), unique=True, max_size=2),
              where=st.sampled_from(["any", "any", "local", "cloud"])),
)

events = st.lists(st.one_of(
    st.tuples(st.just("submit"), needs, st.integers(1, 5)),
    st.tuples(st.just("finish"), st.integers(0, 3), st.integers(1, 4)),
    st.tuples(st.just("time"), st.floats(0.1, 2.0)),
), max_size=40)


class Run:
    """A core, its executors (peer -> caps dict) and what each holds."""

    def __init__(self, fleet: list[dict]):
        self.now = 0.0
        self.core = Core(Config(heartbeat_timeout_s=1e9, reserve_after_s=1.0), wall=lambda: 1e9 + self.now)
        self.core.on_client(b"c", p.Hello(p.PROTOCOL_VERSION, "c", "t"), 0.0)
        self.peers = []
        self.held: dict[bytes, list[p.Assignment]] = {}
        self.needs_of: dict[int, nd.Needs] = {}  # seq -> needs
        self.tid_seq: dict[int, int] = {}
        self.finished: set[int] = set()
        self.seq = self.batch = 0
        for i, e in enumerate(fleet):
            peer = b"e%d" % i
            facts = {"arch": e["arch"], "tags": e["tags"], **({"instance_id": f"i-{i}"} if e["cloud"] else {})}
            self.core.on_executor(peer, p.Register(p.PROTOCOL_VERSION, peer.decode(), "h", [], e["cpus"],
                                                   e["memory_mb"], "linux", e["cpus"], 1, facts, []), 0.0)
            self.core.on_executor(peer, p.Report(2 * e["cpus"], [], []), 0.0)
            self.peers.append(peer)
            self.held[peer] = []
        self.pump()

    def submit(self, need: nd.Needs, n: int) -> None:
        specs = []
        for _ in range(n):
            self.seq += 1
            self.needs_of[self.seq] = need
            specs.append(p.TaskSpec(self.seq, 1, b"x", 0, 0.0, nd.encode(need)))
        self.batch += 1
        self.core.on_client(b"c", p.Submit(self.batch, specs), self.now)
        self.pump()

    def finish(self, i: int, n: int) -> None:
        peer = self.peers[i % len(self.peers)]
        done, self.held[peer] = self.held[peer][:n], self.held[peer][n:]
        results = [p.ExecResult(a.tid, a.attempt, DONE, b"", "", 0.0, 0.0) for a in done]
        self.core.on_executor(peer, p.Report(len(done), [], results), self.now)
        self.pump()

    def pump(self) -> None:
        self.core.dispatch(self.now)
        out = self.core.take_output()
        to_clients, to_executors = out.to_clients, out.to_executors
        for _, msg in to_clients:
            if type(msg) is p.Results:
                self.finished.update(r.seq for r in msg.results if r.state == DONE)
        for peer, msg in to_executors:
            if type(msg) is p.Tasks:
                self.held[peer].extend(msg.tasks)
        self.check()

    def check(self) -> None:
        for peer, ex in self.core.executors.items():
            cpus = mem = 0
            for t in ex.tasks.values():
                if t.needs is not None:
                    assert ex.caps.satisfies(t.needs), f"{t.needs} on an executor with {ex.caps}"
                    cpus += t.needs.cpus
                    mem += t.needs.memory_mb
            assert cpus <= ex.caps.cpus, f"{peer}: tasks with needs hold {cpus} of {ex.caps.cpus} cpus"
            assert mem <= ex.caps.memory_mb, f"{peer}: tasks with needs hold {mem} of {ex.caps.memory_mb} MB"


@settings(max_examples=150, deadline=None)
@given(fleet=executors, script=events)
def test_never_over_committed_and_every_satisfiable_task_finishes(fleet, script):
    run = Run(fleet)
    for ev in script:
        if ev[0] == "submit":
            run.submit(ev[1], ev[2])
        elif ev[0] == "finish":
            run.finish(ev[1], ev[2])
        else:
            run.now += ev[1]
            run.core.tick(run.now)
            run.pump()
    # The drain: a stream of small tasks that never stops (more than the fleet can run, so
    # without reservations a large task could wait for ever), executors finish what they hold.
    scripted = dict(run.needs_of)
    for _ in range(300):
        run.submit(nd.PLAIN, 1 + sum(ex.caps.cpus for ex in run.core.executors.values()) // 2)
        run.submit(nd.make(memory=1), 1)
        run.now += 0.25
        run.core.tick(run.now)
        for i in range(len(run.peers)):
            run.finish(i, 2)
    caps = [ex.caps for ex in run.core.executors.values()]
    satisfiable = {s for s, need in scripted.items() if need.plain or any(c.satisfies(need) for c in caps)}
    assert satisfiable <= run.finished, f"never finished: {sorted(satisfiable - run.finished)[:5]}"
    stuck = set(scripted) - satisfiable
    reported = sum(u["count"] for u in run.core.status(run.now)["unschedulable"])
    assert reported == len(stuck)
