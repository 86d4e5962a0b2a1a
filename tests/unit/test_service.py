"""provisioner/service.py: the provisioning loop against an in-memory backend and dispatcher.

Both clocks are injected, so backoff, boot timeouts and scaling from zero are tested in
microseconds without sleeping.
"""

from __future__ import annotations

import pytest

from falconet import needs, reports
from falconet.errors import LaunchError
from falconet.provisioner import service
from falconet.provisioner.backend import Machine
from falconet.provisioner.policy import InstanceType, Params, Strategy

SMALL = InstanceType("small", vcpus=1, memory_mb=1000, arch="x86_64", site="local")


class Clock:
    """A clock the test moves by hand (one object for the wall and the monotonic clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """Machines in a dict; start() fails while `failures` is above 0."""

    name = "fake"

    def __init__(self, clock: Clock, failures: int = 0):
        self.clock, self.failures = clock, failures
        self.machines: dict[str, Machine] = {}
        self.starts = 0
        self.stopped: list[str] = []

    def types(self) -> tuple[InstanceType, ...]:
        return (SMALL,)

    def list(self) -> list[Machine]:
        return list(self.machines.values())

    def start(self, itype: InstanceType, count: int, token: str) -> list[Machine]:
        self.starts += 1
        if self.failures:
            self.failures -= 1
            raise LaunchError("no capacity")
        made = [Machine(f"m{len(self.machines) + i}", itype.name, "running", self.clock(), token)
                for i in range(count)]
        self.machines.update((m.id, m) for m in made)
        return made

    def stop(self, ids: list[str]) -> None:
        for mid in ids:
            self.machines.pop(mid, None)
        self.stopped += ids

    def api_calls(self) -> dict[str, int]:
        return {}


class FakeDispatcher:
    """The status the provisioner reads; what it releases and reports."""

    def __init__(self) -> None:
        self.queued = 0
        self.rows: dict[str, reports.ExecutorRow] = {}
        self.released: list[str] = []
        self.reports: list[dict] = []

    def status(self, detail: bool = False, timeout_s: float = 0.0) -> dict:
        waiting = (reports.Waiting(needs.PLAIN, self.queued, 1.0),) if self.queued else ()
        return reports.Status(
            dispatcher_id="d", version=0, uptime_s=1.0, durability="in-memory", queued=self.queued, tasks={},
            submitted_total=0, tasks_per_s=0.0, executors=len(self.rows), slots=len(self.rows), busy=0,
            lost_executors=0, stale_results=0, clients=1, unacknowledged_results=0, waiting=waiting,
            detail=detail, executor_table=tuple(self.rows.values())).to_map()

    def register(self, mid: str, assigned: int = 0) -> None:
        self.rows[mid] = reports.ExecutorRow(
            id=mid, host="h", addresses=(), pid=1, cpus=1, memory_mb=1000, platform="linux", slots=1,
            state="active", busy=assigned, assigned=assigned, completed=0, last_seen_s=0.0, idle_s=0.0,
            registered=0.0, arch="x86_64", site="local", tags=("site=local",), cpus_used=assigned, memory_used_mb=0)

    def release_executors(self, ids: list[str], why: str) -> None:
        self.released += ids

    def report_fleet(self, info: dict) -> None:
        self.reports.append(info)


def _provisioner(clock: Clock, backend: FakeBackend, dispatcher: FakeDispatcher, *, renew_before_s: float = 0.0,
                 **params) -> service.Provisioner:
    settings = service.Settings(params=Params(types=(SMALL,), **params), interval_s=5.0, boot_timeout_s=60.0,
                                backoff_base_s=10.0, stop_grace_s=0.0, renew_before_s=renew_before_s)
    return service.Provisioner(settings, backend, dispatcher, wall=clock, clock=clock)  # type: ignore[arg-type]


def _one_launched(max_executors: int = 1, **kw) -> tuple[Clock, FakeBackend, FakeDispatcher, service.Provisioner, str]:
    """A provisioner that launched one node, one at a time, for one waiting task."""
    clock = Clock()
    backend, dispatcher = FakeBackend(clock), FakeDispatcher()
    prov = _provisioner(clock, backend, dispatcher, strategy=Strategy.ONE_AT_A_TIME, max_executors=max_executors, **kw)
    dispatcher.queued = 1
    prov.step()
    (mid,) = backend.machines
    return clock, backend, dispatcher, prov, mid


def test_an_empty_fleet_rounds_fast_and_starts_at_the_first_task():
    clock = Clock()
    backend, dispatcher = FakeBackend(clock), FakeDispatcher()
    prov = _provisioner(clock, backend, dispatcher, strategy=Strategy.ALL_AT_ONCE, max_executors=4)
    prov.step()
    assert backend.starts == 0 and prov._pause() == service.EMPTY_POLL_S
    dispatcher.queued = 3
    prov.step()
    assert len(backend.machines) == 3 and prov._pause() == 5.0
    prov.step()  # the next round sees them, none registered yet
    assert backend.starts == 1 and dispatcher.reports[-1]["counts"]["booting"] == 3


def test_launch_failures_back_off_exponentially_on_the_injected_clock():
    clock = Clock()
    backend, dispatcher = FakeBackend(clock, failures=2), FakeDispatcher()
    prov = _provisioner(clock, backend, dispatcher, strategy=Strategy.ALL_AT_ONCE)
    dispatcher.queued = 2
    prov.step()
    assert backend.starts == 1 and prov.last_error == "no capacity"
    clock.now += 9.9
    prov.step()
    assert backend.starts == 1  # within the first backoff: 10 s
    clock.now += 0.2
    prov.step()
    assert backend.starts == 2  # failed again: the next wait doubles
    clock.now += 19.9
    prov.step()
    assert backend.starts == 2
    clock.now += 0.2
    prov.step()
    assert backend.starts == 3 and len(backend.machines) == 2


def test_a_machine_whose_executor_never_registers_is_stopped_after_the_boot_timeout():
    clock = Clock()
    backend, dispatcher = FakeBackend(clock), FakeDispatcher()
    prov = _provisioner(clock, backend, dispatcher, strategy=Strategy.ONE_AT_A_TIME, max_executors=1)
    dispatcher.queued = 1
    prov.step()
    (mid,) = backend.machines
    clock.now += 59.0
    prov.step()
    assert backend.stopped == []
    clock.now += 2.0
    prov.step()
    assert mid in backend.stopped and prov.failures == 1 and "registered no executor" in prov.last_error


@pytest.mark.parametrize("now", [False, True])
def test_stop_drains_through_the_dispatcher_unless_its_parent_is_gone(now):
    clock = Clock()
    backend, dispatcher = FakeBackend(clock), FakeDispatcher()
    prov = _provisioner(clock, backend, dispatcher, strategy=Strategy.ALL_AT_ONCE, max_executors=2)
    dispatcher.queued = 2
    prov.step()
    for mid in backend.machines:
        dispatcher.register(mid, assigned=1)
    ids = sorted(backend.machines)
    if now:
        prov.stop_now()
    else:
        prov.stop()
    reports = len(dispatcher.reports)
    prov.shutdown()
    assert sorted(backend.stopped) == ids and not backend.machines
    assert dispatcher.released == ([] if now else ids)  # no dispatcher left to drain through
    assert len(dispatcher.reports) == reports + (0 if now else 1)


def test_a_batch_job_that_ends_before_its_executor_registers_is_a_failed_launch_once():
    """squeue lists an ended job for minutes: it counts once, is never stopped, and is no node."""
    clock, backend, dispatcher, prov, mid = _one_launched()
    backend.machines[mid] = Machine(mid, "small", "ended", clock(), "t", "", "FAILED (NonZeroExitCode)")
    for _ in range(3):
        clock.now += 1.0
        prov.step()
    assert prov.failures == 1 and "ended before its executor registered: FAILED" in prov.last_error
    assert backend.stopped == [] and dispatcher.reports[-1]["nodes"] == []
    assert backend.starts == 1  # backing off after the failure, not launching again at once


def test_a_batch_job_that_ends_after_its_executor_left_is_no_failure():
    clock, backend, dispatcher, prov, mid = _one_launched()
    dispatcher.register(mid, assigned=1)
    prov.step()
    dispatcher.queued = 0
    del dispatcher.rows[mid]  # its walltime came; it drained and left
    backend.machines[mid] = Machine(mid, "small", "ended", clock(), "t", "", "COMPLETED")
    prov.step()
    assert prov.failures == 0 and backend.stopped == [] and not prov.last_error


def test_a_node_whose_allocation_is_about_to_end_is_replaced_while_work_waits():
    """A pilot job near its walltime counts as going away: with work waiting, its
    replacement is launched while it still runs; with none, nothing is launched."""
    clock, backend, dispatcher, prov, mid = _one_launched(max_executors=2, renew_before_s=120.0)
    backend.machines[mid] = Machine(mid, "small", "running", clock(), "t", "", "RUNNING", clock() + 600.0)
    dispatcher.register(mid, assigned=1)
    dispatcher.queued = 0  # the task runs there
    prov.step()
    clock.now += 480.0  # 120 s left, and no work waits: nothing to launch
    prov.step()
    assert len(backend.machines) == 1 and dispatcher.reports[-1]["counts"]["releasing"] == 1
    dispatcher.queued = 1  # work waits: the replacement goes now, while the pilot still runs
    clock.now += 1.0
    prov.step()
    assert len(backend.machines) == 2


def test_without_a_renewal_margin_an_ending_node_counts_until_it_drains():
    clock, backend, dispatcher, prov, mid = _one_launched(max_executors=2)
    backend.machines[mid] = Machine(mid, "small", "running", clock(), "t", "", "RUNNING", clock() + 10.0)
    dispatcher.register(mid, assigned=0)
    prov.step()
    assert len(backend.machines) == 1 and dispatcher.reports[-1]["counts"]["idle"] == 1


def test_a_batch_job_the_provisioner_stopped_is_no_failed_launch_when_listed_as_ended():
    """Its executor left, the provisioner cancelled the job, and squeue lists it CANCELLED
    for a while: that is the provisioner's own doing, not a launch that failed."""
    clock, backend, dispatcher, prov, mid = _one_launched()
    dispatcher.register(mid, assigned=1)
    prov.step()
    dispatcher.queued = 0
    del dispatcher.rows[mid]  # it left
    prov.step()
    assert backend.stopped == [mid]
    backend.machines[mid] = Machine(mid, "small", "ended", clock(), "t", "", "CANCELLED")  # squeue still lists it
    clock.now += 1.0
    prov.step()
    assert prov.failures == 0 and not prov.last_error
