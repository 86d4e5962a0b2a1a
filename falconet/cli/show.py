"""The text of `falconet status` and `falconet executors`, from the dispatcher's typed status."""

from __future__ import annotations

import time
from collections.abc import Sequence

import click

from falconet.reports import ExecutorRow, Fleet, Status


def status(info: Status) -> None:
    """Queue depth, tasks by state, tasks/s, placement, the executors and the fleet."""
    tasks = info.tasks
    click.echo(f"dispatcher {info.dispatcher_id}  up {info.uptime_s:.0f}s  "
               f"transport: {info.security.get('mode', 'plain')}")
    click.echo(f"state: {_durability(info)}")
    click.echo(f"queued {info.queued}  dispatched {tasks['dispatched']} (held, not started)  "
               f"running {tasks['running']}  done {tasks['done']}  failed {tasks['failed']}  "
               f"cancelled {tasks['cancelled']}")
    click.echo(f"{info.tasks_per_s:.1f} tasks/s (last 10s)  submitted {info.submitted_total}  "
               f"executors {info.executors} ({info.slots} slots, {tasks['running']} running, "
               f"{info.busy} assigned)  lost {info.lost_executors}")
    _placement(info)
    if info.executor_table:
        click.echo("")
        executor_table(info.executor_table)
    if info.fleet is not None:
        click.echo("")
        _fleet(info.fleet)


def _placement(info: Status) -> None:
    """Queued tasks by requirements, unschedulable ones with the reason, staged files."""
    if any(not w.needs.plain for w in info.waiting):
        for w in info.waiting:
            click.echo(f"waiting {w.count} needing {w.needs}  (oldest {w.oldest_s:.0f}s)")
    for u in info.unschedulable:
        click.echo(f"UNSCHEDULABLE {u.count} tasks for {u.since_s:.0f}s: {u.reason}")
    cache, blobs = info.input_cache, info.blobs
    if cache.get("hits") or cache.get("misses") or blobs.get("blobs"):
        click.echo(f"input cache: {cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses, "
                   f"{cache.get('bytes_fetched', 0) / 1e6:.1f} MB fetched  blob store: {blobs.get('blobs', 0)} "
                   f"files, {blobs.get('bytes', 0) / 1e6:.1f} MB, {blobs.get('fetches', 0)} fetches served")


def _durability(info: Status) -> str:
    """'in memory (lost on a restart)' or 'journal in DIR (N MB)'."""
    if info.durability != "journal":
        return "in memory (tasks are lost if the dispatcher stops; --state-dir keeps a journal)"
    j = info.journal
    text = f"journal in {j['state_dir']} ({j['journal_bytes'] / 1e6:.1f} MB)"
    if j.get("writable") is False:
        text += (f"; NOT WRITABLE for {j.get('since_s', 0):.0f}s: {j.get('error', '')}; new tasks are refused, "
                 f"{j.get('pending_bytes', 0) / 1e6:.1f} MB and {j.get('held_messages', 0)} messages wait for it")
    return text + (f"; recovered a torn tail at start: {j['recovered']}" if j.get("recovered") else "")


def _fleet(f: Fleet) -> None:
    """The provisioner's picture: counts, nodes, spend, and its last decisions with reasons."""
    c = f.counts
    budget = f"  budget ${f.budget_usd:.2f}" if f.budget_usd else ""
    click.echo(f"fleet {f.cluster} ({f.backend}, {f.policy}, {f.min_executors}-"
               f"{f.max_executors} executors)  reported {f.reported_s:.0f}s ago")
    click.echo(f"requested {c.get('requested', 0)}  booting {c.get('booting', 0)}  registered {f.registered} "
               f"(idle {c.get('idle', 0)}, busy {c.get('busy', 0)})  releasing {c.get('releasing', 0)}  "
               f"spent ~${f.spent_usd:.2f}{budget}")
    if f.launch_failures or f.last_error:
        backoff = f"; next launch in {f.backoff_s:.0f}s" if f.backoff_s else ""
        click.echo(f"launch failures {f.launch_failures}{backoff}  last error: {f.last_error}")
    for why in f.unschedulable:
        click.echo(f"no instance type for: {why}")  # this backend's view; the dispatcher's is above
    if f.nodes:
        detail = any(n.detail for n in f.nodes)  # a batch job's state, node and time left
        _table([("NODE", "TYPE", "STATE", "AGE", "ADDRESS") + (("JOB",) if detail else ())]
               + [(n.id, n.type, n.state, f"{n.age_s:.0f}s", n.address or "-") + ((n.detail or "-",) if detail else ())
                  for n in f.nodes])
    for d in f.decisions[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(d.at))
        again = f" (x{d.repeats})" if d.repeats else ""
        for line in d.reasons:
            click.echo(f"{when}{again}  {line}")


def executor_table(rows: Sequence[ExecutorRow]) -> None:
    """RUNNING counts started tasks; ASSIGNED adds those held for the slots (prefetched)."""
    _table([("ID", "HOST", "ADDRESSES", "SLOTS", "CPUS", "MEMORY", "RUNNING", "ASSIGNED", "DONE", "STATE",
             "TAGS", "SEEN")] + [
        (r.id, r.host, ",".join(r.addresses) or "-", str(r.slots), str(r.cpus), f"{r.memory_mb} MB",
         str(r.busy), str(r.assigned), str(r.completed), r.state, ",".join(r.tags) or "-",
         f"{r.last_seen_s:.1f}s ago")
        for r in rows])


def _table(rows: list[tuple[str, ...]]) -> None:
    """Rows in left-aligned columns as wide as their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
