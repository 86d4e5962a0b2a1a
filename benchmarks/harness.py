"""`falconet bench`: every workload of the harness, a table, JSON and plots.

Each figure is the median of several repetitions, kept with its min and max.  Start-up
(clusters, pools, peers) is excluded from throughput and reported apart.  Targets are
ratios measured in the same run, never absolute timings.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import falconet
from falconet.benchmarks import hops


def noop(x):
    return x


def nap(ms):
    time.sleep(ms / 1000)
    return ms


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: --quick is a smoke test, the full run the published figures."""

    repeat: int
    fn_tasks: int
    cmd_tasks: int
    sleep_ms: tuple[float, ...]
    sleep_slots: tuple[int, ...]
    sleep_work_s: float  # ideal duration of each sleep run
    latency_tasks: int
    dispatch_tasks: int
    dispatch_executors: tuple[int, ...]
    memory_tasks: int
    scale_executors: tuple[int, ...]
    scale_tasks: int
    peer_fn_tasks: int
    peer_cmd_tasks: int
    prov_executors: int  # scale-out from 0 on the simulated EC2, per policy
    needs_tasks: int = 0  # requirement matching versus plain tasks, 10 null executors
    needs_repeat: int = 3  # rounds of that comparison (each round runs every variant once)
    scale_idle_s: float = 3.0  # heartbeat cost measured over this long, all executors idle
    scale_runs: int = 3  # task runs on the same registered executors
    prov_stop_grace_s: float = 5.0  # the provisioner's --stop-grace after each scale-out


# Every workload once, at sizes where start-up (processes, Parsl, Dask, moto) dominates:
# about a minute on 2 cores.  The drain after a scale-out always waits out --stop-grace
# (its `sleep` tasks run on, as a cancel does not stop a started task), hence a short one.
QUICK = Plan(repeat=1, fn_tasks=3000, cmd_tasks=300, sleep_ms=(10.0,), sleep_slots=(2,), sleep_work_s=0.5,
             latency_tasks=200, dispatch_tasks=20_000, dispatch_executors=(1, 10), memory_tasks=100_000,
             scale_executors=(1000,), scale_tasks=20_000, peer_fn_tasks=300, peer_cmd_tasks=100,
             prov_executors=4, needs_tasks=20_000, needs_repeat=1, scale_idle_s=1.0, scale_runs=1,
             prov_stop_grace_s=0.5)
FULL = Plan(3, 20_000, 2000, (1.0, 10.0, 100.0), (1, 2, 4), 2.0, 2000, 500_000, (1, 10, 100),
            1_000_000, (1000, 10_000, 54_000), 200_000, 5000, 1000, 32, 500_000, 5,
            # idle executors hear from the dispatcher every heartbeat_timeout / 3 = 10 s: a
            # shorter window can miss the round (10,000 executors measured 0.003 CPU-s/s over
            # 3 s that did, 19,500 0.07-0.09 over 10-12 s that did not)
            scale_idle_s=10.0)

#: the needs of the matching comparison: every task the same, executors registered with
#: cpus = credit and tag gpu (see benchmarks/dispatch.py, dispatch())
NEEDS_VARIANTS = (("plain", {}), ("cpus=1 tag=gpu", {"cpus": 1, "tags": ["gpu"]}),
                  ("cpus=2 tag=gpu", {"cpus": 2, "tags": ["gpu"]}))


def stats(values: list[float]) -> dict:
    """median, min, max and the raw values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def repeat(n: int, fn: Callable[[], float]) -> dict:
    return stats([fn() for _ in range(n)])


def rate(count: int, run: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    run()
    return count / (time.perf_counter() - t0)


# ---------------------------------------------------------------- falconet through the API


def falconet_throughput(plan: Plan, slots: int = 2) -> dict:
    """The peers' workloads through falconet.local(slots), submitted as they submit them: one
    call per task (noop-fn: client.submit, true-cmd and true-sh: client.submit_command),
    plus noop-map (client.map, which pickles the function once and batches)."""
    from falconet.benchmarks.peers import TRUE_ARGV, TRUE_LINE

    t0 = time.perf_counter()
    with falconet.local(slots=slots) as client:
        client.submit(noop, 0).result()
        startup = time.perf_counter() - t0
        list(client.map(noop, range(2000)))  # warm: slots loaded, prefetch sized
        submit_us: list[float] = []

        def per_task(n: int = plan.fn_tasks) -> None:
            t = time.perf_counter()
            futures = [client.submit(noop, i) for i in range(n)]
            submit_us.append((time.perf_counter() - t) / n * 1e6)
            for i, f in enumerate(futures):
                if f.result() != i:
                    raise AssertionError(f"noop({i}) returned {f.result()!r}")

        def commands(cmd: Any, n: int = plan.cmd_tasks) -> None:
            for f in [client.submit_command(cmd) for _ in range(n)]:
                if f.result().exit_code != 0:
                    raise AssertionError(f"{cmd!r}: {f.result()}")

        fn = repeat(plan.repeat, lambda: rate(plan.fn_tasks, per_task))
        fn_map = repeat(plan.repeat, lambda: rate(plan.fn_tasks, lambda: list(client.map(noop, range(plan.fn_tasks)))))
        cmd = repeat(plan.repeat, lambda: rate(plan.cmd_tasks, lambda: commands(TRUE_ARGV)))
        sh = repeat(plan.repeat, lambda: rate(plan.cmd_tasks, lambda: commands(TRUE_LINE)))
    return {"startup_s": startup, "noop-fn": fn, "noop-map": fn_map, "submit_us": stats(submit_us),
            "true-cmd": cmd, "true-sh": sh}


def sleep_efficiency(plan: Plan) -> list[dict]:
    """Efficiency = ideal time / actual time for tasks of D ms on W slots (Falkon's plot)."""
    rows = []
    for slots in plan.sleep_slots:
        with falconet.local(slots=slots) as client:
            list(client.map(nap, [1] * (4 * slots)))
            for ms in plan.sleep_ms:
                n = max(4 * slots, int(plan.sleep_work_s * slots * 1000 / ms))
                ideal = n * ms / 1000 / slots

                def one(n=n, ms=ms, ideal=ideal) -> float:
                    t0 = time.perf_counter()
                    list(client.map(nap, [ms] * n))
                    return ideal / (time.perf_counter() - t0)

                rows.append({"slots": slots, "ms": ms, "tasks": n, "efficiency": repeat(plan.repeat, one)})
    return rows


def latency(plan: Plan) -> dict:
    """One task at a time: submit to result, in milliseconds."""
    with falconet.local(slots=1) as client:
        for i in range(50):
            client.submit(noop, i).result()
        times = []
        for i in range(plan.latency_tasks):
            t0 = time.perf_counter()
            client.submit(noop, i).result()
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"p50_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99)],
            "max_ms": times[-1], "tasks": len(times),
            # the same four processes and hops with no falconet code: what the design allows here
            "floor": hops.floor_latency(max(plan.latency_tasks, 1000))}


def client_memory(n: int) -> dict:
    """The client's memory per outstanding future: n tasks submitted one call each (submit
    and submit_command), accepted by a dispatcher with no executor, so every future waits.
    Each kind in a fresh interpreter: RSS delta / n, and what tracemalloc saw / n."""
    import subprocess
    import sys

    out = {}
    for kind in ("submit", "submit_command"):
        code = f"from falconet.benchmarks import harness; harness._client_memory_child({n}, {kind!r})"
        # -P: the clone's own falconet/ folder (no benchmarks in it) must not shadow the install
        done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"client memory ({kind}) failed: {done.stderr.strip()[-2000:]}")
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _client_memory_child(n: int, kind: str) -> None:
    import gc
    import tracemalloc

    import psutil

    from falconet.local import LocalCluster

    with LocalCluster(executors=0) as cluster, falconet.Client(cluster.client_address) as client:
        client.submit(noop, 0)
        client.submit_command(["/bin/true"])
        gc.collect()
        rss0 = psutil.Process().memory_info().rss
        tracemalloc.start()
        if kind == "submit":
            futures = [client.submit(noop, i) for i in range(n)]
        else:
            futures = [client.submit_command(["/bin/true"]) for _ in range(n)]
        while client.status()["queued"] < n + 2:  # accepted, so the specs sent are dropped
            time.sleep(0.05)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        rss = psutil.Process().memory_info().rss - rss0
        print(json.dumps({"futures": len(futures), "rss_bytes_per_future": rss / n,
                          "traced_bytes_per_future": traced / n}))
        client.close(cancel=True)


# ---------------------------------------------------------------- peers


def peers(plan: Plan, slots: int = 2) -> dict:
    """The same workloads on whichever peer systems are installed."""
    from falconet.benchmarks import peers as peer_mod

    found = peer_mod.available()
    out: dict[str, Any] = {}
    for name in peer_mod.SYSTEMS:
        if name not in found:
            continue
        runner = peer_mod.open_system(name, slots)
        try:
            out[name] = {"version": found[name], **_peer_figures(runner, plan, slots)}
        finally:
            runner.close()
    return out


def _peer_figures(runner: Any, plan: Plan, slots: int) -> dict:
    n_sleep = max(4 * slots, int(plan.sleep_work_s * slots * 1000 / 10))
    ideal = n_sleep * 0.01 / slots
    return {
        "startup_s": runner.startup_s,
        "noop-fn": repeat(plan.repeat, lambda: plan.peer_fn_tasks / runner.run("noop-fn", plan.peer_fn_tasks)),
        "true-cmd": repeat(plan.repeat, lambda: plan.peer_cmd_tasks / runner.run("true-cmd", plan.peer_cmd_tasks)),
        "true-sh": repeat(plan.repeat, lambda: plan.peer_cmd_tasks / runner.run("true-sh", plan.peer_cmd_tasks)),
        "sleep-10ms-efficiency": repeat(plan.repeat, lambda: ideal / runner.run("sleep", n_sleep, 10.0)),
    }


# ---------------------------------------------------------------- the run


def machine() -> dict:
    versions = {}
    for dist in ("falconet", "pyzmq", "msgpack", "cloudpickle", "parsl", "dask", "distributed"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"node": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


WORKLOADS = ("throughput", "sleep", "latency", "dispatch", "memory", "scale", "peers", "provisioning", "engines")


def run(quick: bool = False, only: tuple[str, ...] = (), log: Callable[[str], None] = print) -> dict:
    """Run the chosen workloads (all by default) and return every figure."""
    plan = QUICK if quick else FULL
    chosen = only or WORKLOADS
    result: dict[str, Any] = {"machine": machine(), "quick": quick, "plan": plan.__dict__}
    steps: dict[str, Callable[[], Any]] = {
        "throughput": lambda: falconet_throughput(plan),
        "sleep": lambda: sleep_efficiency(plan),
        "latency": lambda: latency(plan),
        "dispatch": lambda: _dispatch(plan, _dispatch_module()),
        "memory": lambda: {**_dispatch_module().memory(plan.memory_tasks),
                           "client": client_memory(min(plan.memory_tasks // 5, 200_000))},
        "scale": lambda: [scale_row(plan, n, _dispatch_module()) for n in plan.scale_executors],
        "peers": lambda: peers(plan),
        "provisioning": lambda: _provisioning(plan),
        "engines": lambda: _engines().run(quick),  # workflow engines on falconet vs their own
    }
    for name in chosen:
        t0 = time.perf_counter()
        log(f"running {name} ...")
        result[name] = steps[name]()
        result.setdefault("took_s", {})[name] = time.perf_counter() - t0
    return result


def _dispatch_module() -> Any:
    from falconet.benchmarks import dispatch

    return dispatch


def _engines() -> Any:
    from falconet.benchmarks import engines

    return engines


def _provisioning(plan: Plan) -> list[dict]:
    from falconet.benchmarks import provisioning

    return provisioning.run(plan.prov_executors, plan.repeat, stop_grace_s=plan.prov_stop_grace_s)


def scale_row(plan: Plan, executors: int, dispatch: Any) -> dict:
    """scale() with this many executors, or why it cannot run here: the dispatcher needs a
    descriptor for each, and the hard file limit is the machine's to raise, not ours."""
    most = dispatch.max_executors()
    if executors > most:
        return {"executors": executors, "skipped": f"the hard RLIMIT_NOFILE allows {most:,} executors"}
    return dispatch.scale(executors, plan.scale_tasks, idle_s=plan.scale_idle_s, runs=plan.scale_runs)


def _dispatch(plan: Plan, dispatch: Any) -> dict:
    rows = []
    for n in plan.dispatch_executors:
        rows.append({"executors": n, "tasks_per_s": repeat(
            plan.repeat, lambda n=n: dispatch.dispatch(plan.dispatch_tasks, n)["tasks_per_s"])})
    # the same records in the same batches: null executors grant a credit of 64
    bare = repeat(plan.repeat, lambda: dispatch.bare_zmq(plan.dispatch_tasks, 10, batch=64)["records_per_s"])
    # the cost of durability: the same run with the journal on, alternating so drift hits both
    memory, journal = [], []
    for _ in range(plan.repeat):
        memory.append(dispatch.dispatch(plan.dispatch_tasks, 10)["tasks_per_s"])
        journal.append(dispatch.dispatch(plan.dispatch_tasks, 10, journal=True)["tasks_per_s"])
    return {"rows": rows, "bare_zmq_10": bare,
            "journal_10": {"in_memory": stats(memory), "journal": stats(journal)},
            "needs_10": needs_matching(plan, dispatch), "observed_10": observed(plan, dispatch)}


def observed(plan: Plan, dispatch: Any) -> dict:
    """What watching costs the dispatcher: 10 null executors, without task events
    (--event-history 0), with them (the default), and watched (HTTP on, /metrics scraped
    every 100 ms and /api/dashboard fetched every second by another process); the variants
    run in turn, round after round, so drift hits them all."""
    variants = {"no events": {"events": False}, "events": {}, "watched": {"watched": True}}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(plan.repeat):
        for name, kw in variants.items():
            runs[name].append(dispatch.dispatch(plan.dispatch_tasks, 10, **kw)["tasks_per_s"])
    out = {name: {"tasks_per_s": stats(rates)} for name, rates in runs.items()}
    for name, base in (("events", "no events"), ("watched", "events")):
        out[name]["ratio"] = statistics.median(runs[name]) / statistics.median(runs[base])
        out[name]["round_ratio"] = stats([a / b for a, b in zip(runs[name], runs[base])])
    return out


def needs_matching(plan: Plan, dispatch: Any, executors: int = 10, credit: int = 64) -> dict:
    """Requirement matching versus the plain fast path: the same null executors (cpus =
    credit, tag gpu), every task plain or every task with the same needs; the variants run
    in turn, round after round, so drift hits them all.  tasks/s from the first Submit to
    the last Result, dispatcher CPU microseconds per task over the same span; ratios to
    plain are the ratio of the medians and the median of each round's ratio."""
    from falconet import needs as nd

    coded = {name: nd.encode(nd.make(**kw)) if kw else b"" for name, kw in NEEDS_VARIANTS}
    runs: dict[str, list[dict]] = {name: [] for name in coded}
    for _ in range(plan.needs_repeat):
        for name, needs in coded.items():
            runs[name].append(dispatch.dispatch(plan.needs_tasks, executors, credit, needs=needs))
    out: dict[str, Any] = {"executors": executors, "credit": credit, "tasks": plan.needs_tasks, "variants": {}}
    plain = runs["plain"]
    for name, rs in runs.items():
        rates = [r["tasks_per_s"] for r in rs]
        out["variants"][name] = {
            "needs": coded[name].hex(),
            "tasks_per_s": stats(rates),
            "cpu_us_per_task": stats([r["dispatcher_cpu_s"] * 1e6 / plan.needs_tasks for r in rs]),
            "tasks_per_message": stats([r["tasks_per_message"] for r in rs]),
            "ratio_to_plain": statistics.median(rates) / statistics.median([r["tasks_per_s"] for r in plain]),
            "round_ratio_to_plain": stats([r["tasks_per_s"] / q["tasks_per_s"] for r, q in zip(rs, plain)]),
        }
    return out


# ---------------------------------------------------------------- reporting


def targets(r: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, required, measured, met) for every target the run can judge."""
    out: list[tuple[str, str, str, bool | None]] = []

    def med(x: dict) -> float:
        return x["median"]

    thr, prs = r.get("throughput"), r.get("peers", {})
    if thr:
        fn = med(thr["noop-fn"])
        for peer, need in (("processpool", 1.5), ("dask", 20), ("parsl-htex", 20)):
            if peer in prs:
                ratio = fn / med(prs[peer]["noop-fn"])
                out.append((f"noop-fn vs {peer}", f">= {need}x", f"{ratio:.1f}x", ratio >= need))
        if "processpool" in prs:
            for workload in ("true-cmd", "true-sh"):
                if workload in thr and workload in prs["processpool"]:
                    ratio = med(thr[workload]) / med(prs["processpool"][workload])
                    out.append((f"{workload} vs processpool", ">= 1.0x", f"{ratio:.2f}x", ratio >= 1.0))
        out.append(("noop-fn, one submit() per task", ">= 50,000/s", f"{fn:,.0f}/s", fn >= 50_000))
        if "submit_us" in thr:
            us = med(thr["submit_us"])
            out.append(("submit() per call", "<= 10 us", f"{us:.1f} us", us <= 10))
    for row in r.get("sleep", []):
        if row["slots"] == 2 and row["ms"] == 10.0:
            e = med(row["efficiency"])
            out.append(("sleep 10 ms W=2 efficiency", ">= 0.97", f"{e:.3f}", e >= 0.97))
    d = r.get("dispatch")
    if d:
        ten = [x for x in d["rows"] if x["executors"] == 10]
        if ten:
            ratio = med(ten[0]["tasks_per_s"]) / med(d["bare_zmq_10"])
            out.append(("dispatch(10) / bare ZeroMQ(10)", ">= 0.35", f"{ratio:.2f}", ratio >= 0.35))
        if "journal_10" in d:
            j = d["journal_10"]
            ratio = med(j["journal"]) / med(j["in_memory"])
            out.append(("dispatch(10) with journal / in memory", ">= 0.5", f"{ratio:.2f}", ratio >= 0.5))
        for name, v in d.get("needs_10", {}).get("variants", {}).items():
            if name != "plain":  # matching may cost, but not the fast path's order of magnitude
                ratio = v["ratio_to_plain"]
                out.append((f"dispatch(10) {name} / plain", ">= 0.7", f"{ratio:.2f}", ratio >= 0.7))
        obs = d.get("observed_10")
        if obs:
            ratio = obs["watched"]["ratio"]
            out.append(("dispatch(10) watched / not", ">= 0.95", f"{ratio:.2f}", ratio >= 0.95))
            ratio = obs["events"]["ratio"]
            out.append(("dispatch(10) with events / without", ">= 0.9", f"{ratio:.2f}", ratio >= 0.9))
    lat = r.get("latency")
    if lat:
        out.append(("latency p50", "<= 0.4 ms", f"{lat['p50_ms']:.2f} ms", lat["p50_ms"] <= 0.4))
        out.append(("latency p99", "<= 1 ms", f"{lat['p99_ms']:.2f} ms", lat["p99_ms"] <= 1))
    mem = r.get("memory")
    if mem:
        out.append(("memory per queued task", "<= 300 B", f"{mem['bytes_per_task']:.0f} B",
                    mem["bytes_per_task"] <= 300))
        for kind, c in mem.get("client", {}).items():
            per = c["rss_bytes_per_future"]
            out.append((f"client memory per outstanding future ({kind})", "<= 1,024 B", f"{per:.0f} B", per <= 1024))
    sc = r.get("scale")
    if sc and d:
        ten = [x for x in d["rows"] if x["executors"] == 10]
        for n in (10_000, 54_000):
            big = [x for x in sc if x["executors"] == n]
            if not ten or not big:
                continue
            name = f"dispatch with {n:,} executors / with 10"
            if "skipped" in big[0]:
                out.append((name, ">= 0.5", f"not run: {big[0]['skipped']}", None))
                continue
            ratio = big[0]["tasks_per_s"] / med(ten[0]["tasks_per_s"])
            out.append((name, ">= 0.5", f"{ratio:.2f}", ratio >= 0.5))
    return out


def scale_line(row: dict) -> str:
    """One scale() row of the table: registration, throughput, memory, heartbeat cost."""
    head = f"scale, {row['executors']:,} executors: "
    if "skipped" in row:
        return head + f"not run ({row['skipped']})"
    memory = f"{row['bytes_per_executor'] / 1024:,.1f} KiB of dispatcher memory per executor, " \
        if "bytes_per_executor" in row else ""
    return head + (f"registered in {row['registered_s']:.1f}s, {row['tasks_per_s']:,.0f} tasks/s "
                   f"({row['tasks_per_s_min']:,.0f}-{row['tasks_per_s_max']:,.0f}), {memory}"
                   f"heartbeat cost {row['idle_cpu_per_s']:.3f} CPU-s/s")


def provisioning_line(row: dict) -> str:
    """One scale-out row: times to the first and the last executor, and the backend's calls."""
    slurm = row.get("backend") == "slurm"
    where = "a local Slurm (pilot jobs)" if slurm else "simulated EC2"
    head = f"scale-out 0 -> {row['executors']} on {where}, {row['policy']}: "
    if "skipped" in row:
        return head + f"not run ({row['skipped']})"
    calls = ", ".join(f"{k} {v}" for k, v in sorted(row["api_calls"].items()))
    firsts = sorted(x["first_registered_s"] for x in row["runs"])
    return (head + f"first executor {firsts[len(firsts) // 2]:.1f}s, all {row['all_registered_s']:.1f}s "
            f"({min(x['all_registered_s'] for x in row['runs']):.1f}-"
            f"{max(x['all_registered_s'] for x in row['runs']):.1f}), "
            f"{row['total_api_calls']} {'Slurm commands' if slurm else 'EC2 API calls'} ({calls})")


def table(r: dict) -> str:
    """The human-readable summary of a run."""
    lines = [f"# falconet bench on {r['machine']['node']} ({r['machine']['cpus']} CPUs, "
             f"python {r['machine']['python']}), {'quick' if r['quick'] else 'full'} run, "
             f"medians of {r['plan']['repeat']} (min-max)"]

    def fmt(x: dict, unit: str = "/s", digits: int = 0) -> str:
        return f"{x['median']:,.{digits}f}{unit} ({x['min']:,.{digits}f}-{x['max']:,.{digits}f})"

    if "throughput" in r:
        t = r["throughput"]
        lines.append(f"falconet.local(2): noop-fn {fmt(t['noop-fn'])} (submit() {fmt(t['submit_us'], ' us', 1)} "
                     f"a call), noop-map {fmt(t['noop-map'])}, true-cmd {fmt(t['true-cmd'])}, "
                     f"true-sh {fmt(t['true-sh'])}, start-up {t['startup_s']:.2f}s")
    for name, p in r.get("peers", {}).items():
        lines.append(f"{name} {p['version']}: noop-fn {fmt(p['noop-fn'])}, true-cmd {fmt(p['true-cmd'])}, "
                     f"true-sh {fmt(p['true-sh'])}, "
                     f"sleep 10 ms efficiency {fmt(p['sleep-10ms-efficiency'], '', 3)}, "
                     f"start-up {p['startup_s']:.2f}s")
    for row in r.get("sleep", []):
        lines.append(f"sleep {row['ms']:g} ms, W={row['slots']}, {row['tasks']} tasks: efficiency "
                     f"{fmt(row['efficiency'], '', 3)}")
    if "latency" in r:
        lat = r["latency"]
        line = f"latency: p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms"
        if "floor" in lat:  # absent from runs before it was measured
            line += (f" (the same processes and hops with no falconet code, benchmarks/hops.py: "
                     f"p50 {lat['floor']['p50_ms']:.2f} ms, p99 {lat['floor']['p99_ms']:.2f} ms)")
        lines.append(line)
    if "dispatch" in r:
        for row in r["dispatch"]["rows"]:
            lines.append(f"dispatch, {row['executors']} null executors: {fmt(row['tasks_per_s'])}")
        lines.append(f"bare ZeroMQ loop, 10 peers: {fmt(r['dispatch']['bare_zmq_10'])}")
        if "journal_10" in r["dispatch"]:
            j = r["dispatch"]["journal_10"]
            lines.append(f"dispatch, 10 null executors, journal on: {fmt(j['journal'])} "
                         f"(in memory, same runs: {fmt(j['in_memory'])})")
        if "needs_10" in r["dispatch"]:
            nm = r["dispatch"]["needs_10"]
            for name, v in nm["variants"].items():
                vs = "" if name == "plain" else (f", {v['ratio_to_plain']:.2f}x plain (per round "
                                                 f"{fmt(v['round_ratio_to_plain'], 'x', 2)})")
                lines.append(f"dispatch, {nm['executors']} null executors (cpus {nm['credit']}, tag gpu), {name} tasks: "
                             f"{fmt(v['tasks_per_s'])}, {fmt(v['cpu_us_per_task'], ' us', 1)} dispatcher CPU "
                             f"per task{vs}")
        for name, v in r["dispatch"].get("observed_10", {}).items():
            vs = f", {v['ratio']:.2f}x the row above (per round {fmt(v['round_ratio'], 'x', 2)})" if "ratio" in v else ""
            lines.append(f"dispatch, 10 null executors, {name}: {fmt(v['tasks_per_s'])}{vs}")
    if "memory" in r:
        lines.append(f"memory: {r['memory']['bytes_per_task']:.0f} bytes per queued task")
        for kind, c in r["memory"].get("client", {}).items():
            lines.append(f"client memory per outstanding future, {c['futures']:,} from {kind}(): "
                         f"{c['rss_bytes_per_future']:.0f} B RSS ({c['traced_bytes_per_future']:.0f} B of Python objects)")
    for row in r.get("scale", []):
        lines.append(scale_line(row))
    for row in r.get("provisioning", []):
        lines.append(provisioning_line(row))
    if "engines" in r:
        lines += _engines().lines(r["engines"])
    lines.append("")
    lines.append("target | required | measured | met")
    for name, need, got, met in targets(r):
        lines.append(f"{name} | {need} | {got} | {'-' if met is None else 'yes' if met else 'NO'}")
    return "\n".join(lines)


def plots(r: dict, out_dir: str) -> list[str]:
    """PNG plots, when matplotlib is installed (the [bench] extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    if r.get("sleep"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for slots in sorted({row["slots"] for row in r["sleep"]}):
            rows = [row for row in r["sleep"] if row["slots"] == slots]
            ax.plot([row["ms"] for row in rows], [row["efficiency"]["median"] for row in rows],
                    marker="o", label=f"W={slots}")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("task length (ms)")
        ax.set_ylabel("efficiency (ideal / actual)")
        ax.set_title("falconet: efficiency versus task length")
        ax.legend()
        made.append(_save(fig, out_dir, "efficiency.png"))
    if r.get("throughput"):
        systems = {"falconet": r["throughput"]} | r.get("peers", {})
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        for ax, workload in zip(axes, ("noop-fn", "true-cmd", "true-sh")):
            names = list(systems)
            ax.bar(names, [systems[n][workload]["median"] for n in names],
                   color=["tab:red"] + ["tab:gray"] * (len(names) - 1))
            ax.set_title(f"{workload}, W=2 (tasks/s, median)")
            ax.set_yscale("log")
            ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        made.append(_save(fig, out_dir, "throughput.png"))
    if r.get("dispatch"):
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = r["dispatch"]["rows"]
        ax.plot([x["executors"] for x in rows], [x["tasks_per_s"]["median"] for x in rows], marker="o",
                label="dispatcher")
        for row in r.get("scale", []):
            if "skipped" not in row:
                ax.plot([row["executors"]], [row["tasks_per_s"]], marker="s", color="tab:orange")
        ax.axhline(r["dispatch"]["bare_zmq_10"]["median"], ls="--", color="gray", label="bare ZeroMQ loop")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("executors")
        ax.set_ylabel("tasks/s")
        ax.set_title("dispatcher ceiling (null executors)")
        ax.legend()
        made.append(_save(fig, out_dir, "dispatch.png"))
    return made


def _save(fig: Any, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path


def main(quick: bool, out_dir: str, only: tuple[str, ...] = ()) -> dict:
    """Run, print the table, write results.json and the plots into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    r = run(quick, only)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(r, f, indent=2)
    text = table(r)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    for path in plots(r, out_dir):
        print(f"wrote {path}")
    return r
