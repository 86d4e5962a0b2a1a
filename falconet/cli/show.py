"""The text of `falconet status` and `falconet executors`, from the dispatcher's statistics."""

from __future__ import annotations

import time

import click


def status(info: dict) -> None:
    """Queue depth, tasks by state, tasks/s, placement, the executors and the fleet."""
    tasks = info["tasks"]
    click.echo(f"dispatcher {info['dispatcher_id']}  up {info['uptime_s']:.0f}s  "
               f"transport: {info.get('security', {}).get('mode', 'plain')}")
    click.echo(f"state: {_durability(info)}")
    click.echo(f"queued {info['queued']}  dispatched {tasks['dispatched']} (held, not started)  "
               f"running {tasks['running']}  done {tasks['done']}  failed {tasks['failed']}  "
               f"cancelled {tasks['cancelled']}")
    click.echo(f"{info['tasks_per_s']:.1f} tasks/s (last 10s)  submitted {info['submitted_total']}  "
               f"executors {info['executors']} ({info['slots']} slots, {tasks['running']} running, "
               f"{info['busy']} assigned)  lost {info['lost_executors']}")
    _placement(info)
    if info.get("executor_table"):
        click.echo("")
        executor_table(info["executor_table"])
    if info.get("fleet"):
        click.echo("")
        _fleet(info["fleet"])


def _placement(info: dict) -> None:
    """Queued tasks by requirements, unschedulable ones with the reason, staged files."""
    from falconet import needs

    waiting = info.get("waiting", [])
    if any(w["needs"] != needs.PLAIN.to_dict() for w in waiting):
        for w in waiting:
            n = needs.make(**{k if k != "memory_mb" else "memory": v for k, v in w["needs"].items()})
            click.echo(f"waiting {w['count']} needing {n}  (oldest {w['oldest_s']:.0f}s)")
    for u in info.get("unschedulable", []):
        click.echo(f"UNSCHEDULABLE {u['count']} tasks for {u['since_s']:.0f}s: {u['reason']}")
    cache, blobs = info.get("input_cache", {}), info.get("blobs", {})
    if cache.get("hits") or cache.get("misses") or blobs.get("blobs"):
        click.echo(f"input cache: {cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses, "
                   f"{cache.get('bytes_fetched', 0) / 1e6:.1f} MB fetched  blob store: {blobs.get('blobs', 0)} "
                   f"files, {blobs.get('bytes', 0) / 1e6:.1f} MB, {blobs.get('fetches', 0)} fetches served")


def _durability(info: dict) -> str:
    """'in memory (lost on a restart)' or 'journal in DIR (N MB)'."""
    if info["durability"] != "journal":
        return "in memory (tasks are lost if the dispatcher stops; --state-dir keeps a journal)"
    j = info["journal"]
    text = f"journal in {j['state_dir']} ({j['journal_bytes'] / 1e6:.1f} MB)"
    return text + (f"; recovered a torn tail at start: {j['recovered']}" if j.get("recovered") else "")


def _fleet(f: dict) -> None:
    """The provisioner's picture: counts, nodes, spend, and its last decisions with reasons."""
    c = f["counts"]
    budget = f"  budget ${f['budget_usd']:.2f}" if f.get("budget_usd") else ""
    click.echo(f"fleet {f['cluster']} ({f['backend']}, {f['policy']}, {f['min_executors']}-"
               f"{f['max_executors']} executors)  reported {f['reported_s']:.0f}s ago")
    click.echo(f"requested {c['requested']}  booting {c['booting']}  registered {f['registered']} "
               f"(idle {c['idle']}, busy {c['busy']})  releasing {c['releasing']}  "
               f"spent ~${f['spent_usd']:.2f}{budget}")
    if f.get("launch_failures") or f.get("last_error"):
        backoff = f"; next launch in {f['backoff_s']:.0f}s" if f.get("backoff_s") else ""
        click.echo(f"launch failures {f['launch_failures']}{backoff}  last error: {f['last_error']}")
    for why in f.get("unschedulable", []):
        click.echo(f"no instance type for: {why}")  # this backend's view; the dispatcher's is above
    if f.get("nodes"):
        table = [("NODE", "TYPE", "STATE", "AGE", "ADDRESS")] + [
            (n["id"], n["type"], n["state"], f"{n['age_s']:.0f}s", n["address"] or "-") for n in f["nodes"]]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        for row in table:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for d in f.get("decisions", [])[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(d["at"]))
        again = f" (x{d['repeats']})" if d.get("repeats") else ""
        for line in d["reasons"]:
            click.echo(f"{when}{again}  {line}")


def executor_table(rows: list[dict]) -> None:
    """RUNNING counts started tasks; ASSIGNED adds those held for the slots (prefetched)."""
    header = ("ID", "HOST", "ADDRESSES", "SLOTS", "CPUS", "MEMORY", "RUNNING", "ASSIGNED", "DONE", "STATE",
              "TAGS", "SEEN")
    table = [header] + [
        (r["id"], r["host"], ",".join(r["addresses"]) or "-", str(r["slots"]), str(r["cpus"]),
         f"{r['memory_mb']} MB", str(r["busy"]), str(r["assigned"]), str(r["completed"]),
         r["state"], ",".join(r.get("tags", [])) or "-", f"{r['last_seen_s']:.1f}s ago")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
