"""Throughput of falconet.local(slots=W) against ProcessPoolExecutor(W), in one run.

    python benchmarks/local_throughput.py [--slots 2] [--repeat 3] [--fn-tasks 20000] [--cmd-tasks 2000]

Start-up time is excluded (clusters and pools are warmed up before the clock starts).
Prints the median, min and max tasks/s of each workload and the ratio of medians.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import platform
import statistics
import subprocess
import time

import falconet


def noop(x):
    return x


def true_cmd(_):
    return subprocess.run("/bin/true", shell=True, capture_output=True).returncode


def timed(fn) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def falconet_runs(slots: int, repeat: int, n_fn: int, n_cmd: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"noop-fn": [], "true-cmd": []}
    with falconet.local(slots=slots) as client:
        list(client.map(noop, range(2000)))  # warm up: executors registered, slots loaded
        for _ in range(repeat):
            out["noop-fn"].append(timed(lambda: len(list(client.map(noop, range(n_fn))))))
            out["true-cmd"].append(timed(
                lambda: len([f.result() for f in client.submit_commands(["/bin/true"] * n_cmd)])))
    return out


def pool_runs(slots: int, repeat: int, n_fn: int, n_cmd: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"noop-fn": [], "true-cmd": []}
    with cf.ProcessPoolExecutor(slots) as pool:
        list(pool.map(noop, range(2000)))
        for _ in range(repeat):
            out["noop-fn"].append(timed(lambda: len([f.result() for f in [pool.submit(noop, i) for i in range(n_fn)]])))
            out["true-cmd"].append(timed(lambda: len(list(pool.map(true_cmd, range(n_cmd))))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fn-tasks", type=int, default=20_000)
    ap.add_argument("--cmd-tasks", type=int, default=2_000)
    a = ap.parse_args()
    fal = falconet_runs(a.slots, a.repeat, a.fn_tasks, a.cmd_tasks)
    base = pool_runs(a.slots, a.repeat, a.fn_tasks, a.cmd_tasks)
    print(f"# {platform.node()} {platform.machine()} python {platform.python_version()}, "
          f"falconet {falconet.__version__}, W={a.slots}, {a.repeat} repetitions")
    print(f"{'workload':10} {'system':22} {'median/s':>10} {'min/s':>10} {'max/s':>10}")
    for workload in ("noop-fn", "true-cmd"):
        for name, runs in ((f"falconet.local({a.slots})", fal), (f"ProcessPoolExecutor({a.slots})", base)):
            r = runs[workload]
            print(f"{workload:10} {name:22} {statistics.median(r):10.0f} {min(r):10.0f} {max(r):10.0f}")
        ratio = statistics.median(fal[workload]) / statistics.median(base[workload])
        print(f"{workload:10} {'ratio (median)':22} {ratio:10.2f}")


if __name__ == "__main__":
    main()
