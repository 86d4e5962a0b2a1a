"""falconet/cli/show.py: the text of `falconet status` from a typed status."""

from __future__ import annotations

from falconet import needs as nd
from falconet import reports as r
from falconet.cli import show

TASKS = {"pending": 4, "dispatched": 1, "running": 2, "done": 7, "failed": 1, "cancelled": 0}


def _row(eid: str, **kw) -> r.ExecutorRow:
    base = dict(id=eid, host="node1", addresses=("10.0.0.5",), pid=7, cpus=4, memory_mb=8192, platform="linux",
                slots=4, state="active", busy=2, assigned=3, completed=7, last_seen_s=0.25, idle_s=0.0,
                registered=0.0, arch="x86_64", site="local", tags=("gpu", "site=local"), cpus_used=3,
                memory_used_mb=0)
    return r.ExecutorRow(**{**base, **kw})


def test_status_shows_the_queue_placement_executors_and_fleet(capsys):
    big = nd.make(cpus=64)
    fleet = r.Fleet("ec2", "lab", "greedy", 0, 8, 5.0, {"booting": 1, "idle": 1}, 1,
                    nodes=(r.FleetNode("i-1", "c5.large", "booting", 12.0),),
                    decisions=(r.Decision(0.0, ("started 1 c5.large: i-1",), 3),),
                    unschedulable=("cpus=64",), budget_usd=5.0, spent_usd=0.25, reported_s=2.0)
    info = r.Status("d1", 5, 60.0, "journal", 4, TASKS, 15, 3.5, 1, 4, 3, 0, 0, 1, 0,
                    journal={"state_dir": "/var/lib/f", "journal_bytes": 2_000_000},
                    waiting=(r.Waiting(nd.PLAIN, 3, 1.0), r.Waiting(big, 1, 9.0)),
                    unschedulable=(r.Waiting(big, 1, 9.0, "needs 64 cpus, has 4", 8.0),),
                    detail=True, executor_table=(_row("e1"),), fleet=fleet)
    show.status(info)
    out = capsys.readouterr().out
    assert "queued 4  dispatched 1 (held, not started)  running 2  done 7" in out
    assert "journal in /var/lib/f (2.0 MB)" in out
    assert "waiting 1 needing cpus=64  (oldest 9s)" in out and "waiting 3 needing cpus=1" in out
    assert "UNSCHEDULABLE 1 tasks for 8s: needs 64 cpus, has 4" in out
    assert "e1  node1  10.0.0.5" in out and "8192 MB" in out and "gpu,site=local" in out
    assert "fleet lab (ec2, greedy, 0-8 executors)  reported 2s ago" in out
    assert "booting 1  registered 1 (idle 1, busy 0)" in out and "spent ~$0.25  budget $5.00" in out
    assert "no instance type for: cpus=64" in out
    assert "i-1   c5.large  booting  12s  -" in out
    assert "(x3)  started 1 c5.large: i-1" in out


def test_plain_waiting_tasks_are_not_listed_by_needs(capsys):
    info = r.Status("d1", 5, 1.0, "in-memory", 3, TASKS, 3, 0.0, 0, 0, 0, 0, 0, 1, 0,
                    waiting=(r.Waiting(nd.PLAIN, 3, 1.0),))
    show.status(info)
    out = capsys.readouterr().out
    assert "in memory (tasks are lost" in out and "waiting" not in out and "fleet" not in out
