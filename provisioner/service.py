"""The provisioner's loop: read the dispatcher, ask the policy, act through a backend.

Each round (every ``interval_s``):

1. read the dispatcher's status (queue, executor table) and the backend's machines;
2. match machines to executors by id (an executor's id is its instance id), and settle
   what the policy does not decide: a machine with no executor after ``boot_timeout_s``
   is stopped and counted as a failed launch; a machine whose executor registered and then
   left is stopped; a released machine is stopped once its executor has left, or after
   ``release_grace_s``;
3. build the policy's snapshot, decide, and act: launch, or release (the dispatcher asks
   the executor to drain and leave);
4. send the fleet's picture to the dispatcher for ``falconet status``.

Launch failures back off exponentially (``backoff_base_s`` doubling up to
``backoff_max_s``) and are reported, never retried in a tight loop.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from falconet.client import Client
from falconet.errors import FalconetError, LaunchError
from falconet.provisioner import policy
from falconet.provisioner.backend import Backend, Machine
from falconet.provisioner.policy import Node, NodeState, Params, Shape
from falconet.reports import Decision, ExecutorRow, Fleet, FleetNode, Status

log = logging.getLogger("falconet.provisioner")

MAX_NODES_REPORTED = 200
EMPTY_POLL_S = 0.25  #: rounds this often while the fleet is empty and nothing waits


@dataclass(frozen=True)
class Settings:
    """How the loop runs; times in seconds."""

    params: Params
    cluster: str = "falconet"
    interval_s: float = 5.0
    boot_timeout_s: float = 300.0
    release_grace_s: float = 600.0  #: a released executor that has not left by then is stopped
    backoff_base_s: float = 10.0
    backoff_max_s: float = 600.0
    keep: bool = False  #: leave the fleet running on stop
    stop_grace_s: float = 30.0  #: on stop, time for executors to drain before their machines stop
    #: a node whose allocation ends within this counts as going away (a pilot job near its
    #: walltime): the policy launches its replacement while it still works, if work waits
    renew_before_s: float = 0.0


def waiting_shapes(status: Status) -> dict[Shape, int]:
    """Queued tasks by shape from the dispatcher's status."""
    out: dict[Shape, int] = {}
    for w in status.waiting:
        if w.count > 0:
            out[w.needs] = out.get(w.needs, 0) + w.count
    return out


class Provisioner:
    """Grows and shrinks one fleet; call step() per round, or run() until stop()."""

    def __init__(self, settings: Settings, backend: Backend, client: Client, *,
                 wall: Any = time.time, clock: Any = time.monotonic):
        """wall: the wall clock (launch times, spend); clock: the monotonic one (backoff)."""
        self.settings = settings
        self.backend = backend
        self.client = client
        self.wall = wall
        self.clock = clock
        self.run_id = uuid.uuid4().hex[:6]
        self.launch_seq = 0
        self.streak = 0
        self.failures = 0
        self.backoff_until = 0.0
        self.last_error = ""
        self.retry: tuple[str, int, str] | None = None  # (type, count, token) of a failed launch
        self.registered_once: set[str] = set()  # machines whose executor has registered
        self.ended: set[str] = set()  # batch jobs seen ended (squeue lists them for a while)
        self.releasing: dict[str, float] = {}  # machine id -> when it was released
        self.ledger: dict[str, list] = {}  # machine id -> [launched, ended or None, $/h]
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=20)
        self.first_registered_at: float | None = None
        self.rounds = 0
        self.last_info: Fleet | None = None
        self._stop = threading.Event()
        self._drain = True  # on stop, let executors finish (False: stop_now)
        self.empty = False  # the last round saw no machine and no waiting work
        self._prices = {t.name: t.price_per_hour for t in backend.types()}
        self._types = {t.name: t for t in backend.types()}

    # ------------------------------------------------------------ lifecycle

    def adopt(self, clean_orphans: bool = False) -> list[Machine]:
        """Take over (or, with clean_orphans, stop) machines already running with our tag."""
        found = [m for m in self.backend.list() if m.state != "ended"]
        if found and clean_orphans:
            log.warning("stopping %d orphaned machines of cluster %s: %s", len(found),
                        self.settings.cluster, ", ".join(m.id for m in found))
            self.backend.stop([m.id for m in found])
            return []
        for m in found:
            self._charge_from(m)
        if found:
            log.info("adopted %d running machines of cluster %s", len(found), self.settings.cluster)
            self._note(self.wall(), [f"adopted {len(found)} machines found by tag: "
                                     + ", ".join(m.id for m in found[:10])])
        return found

    def run(self) -> None:
        """Rounds every interval until stop(); then stop the fleet unless keep."""
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                except FalconetError as exc:  # the dispatcher or the cloud: report, go on
                    self._error(str(exc))
                self._stop.wait(self._pause())
        finally:
            self.shutdown()

    def _pause(self) -> float:
        """Seconds to the next round: short while the fleet is empty and no work waits.

        Scaling from zero then starts within EMPTY_POLL_S of the first task instead of up
        to a whole interval later; such a round's status is small, as no executor is there.
        """
        return min(EMPTY_POLL_S, self.settings.interval_s) if self.empty else self.settings.interval_s

    def stop(self, *_: Any) -> None:
        """Ask run() to end after its current round (safe from a signal handler)."""
        self._stop.set()

    def stop_now(self) -> None:
        """End without draining: whoever started this provisioner, and its dispatcher, are gone."""
        self._drain = False
        self._stop.set()

    def shutdown(self) -> None:
        """Drain and stop every machine of the fleet, unless settings.keep."""
        if self.settings.keep:
            log.info("leaving the fleet running (--keep)")
            return
        try:
            machines = [m for m in self.backend.list() if m.state != "ended"]
        except FalconetError as exc:
            log.error("could not list the fleet to stop it: %s", exc)
            return
        if not machines:
            return
        ids = [m.id for m in machines]
        if self._drain:
            self._drain_fleet(ids)
        log.info("stopping %d machines", len(ids))
        self.backend.stop(ids)
        for mid in ids:
            self._charge_to(mid, self.wall())
        if self._drain:  # else no dispatcher is left to report to
            self._report(self.wall(), machines, {}, None)

    def _drain_fleet(self, ids: list[str]) -> None:
        """Release these executors and wait up to stop_grace_s for them to leave."""
        deadline = time.monotonic() + self.settings.stop_grace_s
        try:
            self.client.release_executors(ids, "the provisioner is stopping")
            while time.monotonic() < deadline:
                live = {r.id for r in self._status(5.0).executor_table}
                if not live & set(ids):
                    break
                time.sleep(min(1.0, self.settings.interval_s))  # not _stop.wait: it is set, so it would spin
        except FalconetError as exc:
            log.warning("could not drain the fleet (%s); stopping it now", exc)

    # ------------------------------------------------------------ one round

    def step(self) -> policy.Decision:
        """One round: observe, settle, decide, act, report."""
        self.rounds += 1
        status = self._status(max(5.0, self.settings.interval_s))
        machines = self.backend.list()
        now = self.wall()
        rows = {r.id: r for r in status.executor_table}
        machines = self._settle(machines, rows, now)
        nodes = tuple(self._node(m, rows.get(m.id), now) for m in machines)
        snap = policy.Snapshot(
            waiting=waiting_shapes(status),
            nodes=nodes, spent_usd=self.spent(now), streak=self.streak,
            backoff_s=max(0.0, self.backoff_until - self.clock()), backoff_reason=self.last_error)
        decision = policy.decide(snap, self.settings.params)
        self.empty = not nodes and not snap.waiting
        self.streak = decision.streak
        reasons = list(decision.reasons)
        for mid in decision.release:
            why = next((r.split(": ", 1)[1] for r in decision.reasons if r.startswith(f"release {mid}:")),
                       "released by the provisioner")
            self.client.release_executors([mid], why)
            self.releasing.setdefault(mid, now)
        for launch in decision.launch:
            reasons += self._launch(launch, now)
        if reasons or decision.unschedulable:
            self._note(now, reasons + list(decision.unschedulable))
        self._report(now, machines, rows, decision)
        return decision

    def _status(self, timeout_s: float) -> Status:
        return Status.from_map(self.client.status(detail=True, timeout_s=timeout_s))

    def _settle(self, machines: list[Machine], rows: dict[str, ExecutorRow], now: float) -> list[Machine]:
        """Stop machines that failed to boot, whose executor left, or that were released;
        count a batch job that ended before its executor registered as a failed launch."""
        machines = self._ended(machines, now)
        gone, why = [], []
        for m in machines:
            self._charge_from(m)
            row = rows.get(m.id)
            if row is not None:
                if m.id not in self.registered_once:
                    self.registered_once.add(m.id)
                    if self.first_registered_at is None:
                        self.first_registered_at = now
                    self.failures = 0  # a launch worked end to end
                continue
            if m.id in self.releasing:
                gone.append(m.id)
                why.append(f"stop {m.id}: released and its executor has left")
            elif m.id in self.registered_once:
                gone.append(m.id)
                why.append(f"stop {m.id}: its executor left")
            elif now - m.launched > self.settings.boot_timeout_s:
                gone.append(m.id)
                self._failed(f"{m.id} ({m.itype}) registered no executor within "
                             f"{self.settings.boot_timeout_s:g}s of launch")
                why.append(f"stop {m.id}: no executor within the boot timeout")
        for mid, since in self.releasing.items():
            row = rows.get(mid)
            if row is not None and now - since > self.settings.release_grace_s and mid not in gone:
                gone.append(mid)
                why.append(f"stop {mid}: released {now - since:.0f}s ago and still not gone")
        if gone:
            self.backend.stop(gone)
            self.ended.update(gone)  # a batch job listed as ended after this is no news
            for mid in gone:
                self._charge_to(mid, now)
                self.releasing.pop(mid, None)
            self._note(now, why)
        live = {m.id for m in machines} - set(gone)
        for mid in list(self.releasing):
            if mid not in live:
                self.releasing.pop(mid)
        for mid in list(self.registered_once):
            if mid not in live:
                self.registered_once.discard(mid)
        return [m for m in machines if m.id in live]

    def _ended(self, machines: list[Machine], now: float) -> list[Machine]:
        """The machines still there; notes the batch jobs that ended (nothing to stop)."""
        live = []
        for m in machines:
            if m.state != "ended":
                live.append(m)
                continue
            if m.id in self.ended:
                continue
            self.ended.add(m.id)
            self._charge_from(m)
            self._charge_to(m.id, now)
            if m.id not in self.registered_once and m.id not in self.releasing:
                self._failed(f"{m.id} ended before its executor registered: {m.detail or 'no reason given'}")
                self._note(now, [f"{m.id} ended: {m.detail}"])
        listed = {m.id for m in machines}
        self.ended &= listed  # forget those the backend no longer lists
        return live

    def _node(self, m: Machine, row: ExecutorRow | None, now: float) -> Node:
        itype = self._types.get(m.itype) or policy.InstanceType(m.itype, 1, 0, "", 0.0)
        if m.id in self.releasing:
            state = NodeState.RELEASING
        elif m.ends_at and m.ends_at - now <= self.settings.renew_before_s:
            state = NodeState.RELEASING  # its job is about to end: it is going, not leaving room
        elif row is None:
            state = NodeState.BOOTING
        elif row.draining:
            state = NodeState.RELEASING
        else:
            state = NodeState.BUSY if row.assigned else NodeState.IDLE
        return Node(m.id, itype, state, busy=row.assigned if row else 0,
                    idle_s=row.idle_s if row else 0.0, age_s=now - m.launched,
                    cpus_used=row.cpus_used if row else None)

    def _launch(self, launch: policy.Launch, now: float) -> list[str]:
        itype, count = launch.itype, launch.count
        if self.retry and self.retry[:2] == (itype.name, count):
            token = self.retry[2]  # same launch again: the backend checks what the first try did
        else:
            self.launch_seq += 1
            token = f"{self.settings.cluster}-{self.run_id}-{self.launch_seq:04d}"
        try:
            started = self.backend.start(itype, count, token)
        except LaunchError as exc:
            self.retry = (itype.name, count, token)
            self._failed(str(exc))
            return [f"launch of {count} {itype.name} failed: {exc}"]
        self.retry = None
        for m in started:
            self._charge_from(m)
        return [f"started {len(started)} {itype.name}: " + ", ".join(m.id for m in started[:8])
                + (" ..." if len(started) > 8 else "")]

    def _failed(self, why: str) -> None:
        self.failures += 1
        delay = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (self.failures - 1))
        self.backoff_until = self.clock() + delay
        self.last_error = why
        log.warning("launch failure %d: %s; no launch for %.0fs", self.failures, why, delay)

    def _error(self, why: str) -> None:
        self.last_error = why
        log.error("round failed: %s", why)
        self._note(self.wall(), [f"round failed: {why}"])
        if self.last_info:  # status shows the failure, not a silently stale picture
            info = dataclasses.replace(self.last_info, last_error=why, rounds=self.rounds,
                                       decisions=tuple(self.decisions)[-10:])
            try:
                self.client.report_fleet(info.to_map())
            except FalconetError:
                pass

    # ------------------------------------------------------------ spend

    def _charge_from(self, m: Machine) -> None:
        if m.id not in self.ledger:
            self.ledger[m.id] = [m.launched, None, self._prices.get(m.itype, 0.0)]

    def _charge_to(self, mid: str, when: float) -> None:
        entry = self.ledger.get(mid)
        if entry is not None and entry[1] is None:
            entry[1] = when

    def spent(self, now: float) -> float:
        """Estimated spend so far: each machine's hours (at least the minimum charge) × price."""
        least = self.settings.params.min_charge_s
        total = 0.0
        for launched, ended, price in self.ledger.values():
            total += price * max(least, (ended or now) - launched) / 3600
        return total

    # ------------------------------------------------------------ reporting

    def _note(self, now: float, lines: list[str]) -> None:
        last = self.decisions[-1] if self.decisions else None
        if last is not None and last.reasons == tuple(lines):  # the same hold, round after round
            self.decisions[-1] = dataclasses.replace(last, at=now, repeats=max(last.repeats, 1) + 1)
            return
        for line in lines:
            log.info("%s", line)
        self.decisions.append(Decision(now, tuple(lines)))

    def _report(self, now: float, machines: list[Machine], rows: dict[str, ExecutorRow],
                decision: policy.Decision | None) -> None:
        nodes = [self._node(m, rows.get(m.id), now) for m in machines]
        counts = collections.Counter(n.state.value for n in nodes)
        counts["requested"] = sum(1 for m in machines if m.state == "pending")
        counts["booting"] -= counts["requested"]
        p = self.settings.params
        info = Fleet(
            backend=self.backend.name, cluster=self.settings.cluster, policy=p.strategy.value,
            min_executors=p.min_executors, max_executors=p.max_executors, interval_s=self.settings.interval_s,
            counts={k: counts.get(k, 0) for k in ("requested", "booting", "idle", "busy", "releasing")},
            registered=counts.get("idle", 0) + counts.get("busy", 0),
            nodes=tuple(FleetNode(n.id, n.itype.name, n.state.value, round(n.age_s, 1), m.address,
                                  m.detail or None) for n, m in zip(nodes[:MAX_NODES_REPORTED], machines)),
            decisions=tuple(self.decisions)[-10:],
            unschedulable=tuple(decision.unschedulable) if decision else (),
            can_launch=tuple(t.launchable() for t in p.types),  # for the dispatcher's unschedulable test
            spent_usd=round(self.spent(now), 4), budget_usd=p.budget_usd,
            launch_failures=self.failures,
            backoff_s=max(0.0, math.ceil(self.backoff_until - self.clock())),
            last_error=self.last_error, api_calls=self.backend.api_calls(), rounds=self.rounds,
        )
        self.last_info = info
        try:
            self.client.report_fleet(info.to_map())
        except FalconetError as exc:
            log.warning("could not report the fleet to the dispatcher: %s", exc)
