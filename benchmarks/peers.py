"""The systems users would otherwise pick, running the same workloads as falconet.

    python benchmarks/peers.py [--workers 2] [--systems processpool,parsl-htex,dask]

The harness imports this file by path and calls only the names below:

    SYSTEMS                      the peer systems this module knows
    available() -> {name: ver}   the ones importable here (processpool always: the Python version)
    open_system(name, workers)   a started Runner with exactly `workers` worker processes
    runner.startup_s             start-up wall seconds, until one warm-up task has returned
    runner.run(workload, n, sleep_ms=0.0) -> elapsed wall seconds for n tasks (results checked)
    runner.close()

Workloads, each submitted one future per task, the way each system documents submitting many
independent tasks:

    noop-fn   a module-level function that returns its argument at once
    true-cmd  /bin/true as an argv, its output captured: subprocess.run(["/bin/true"],
              capture_output=True) in a function (falconet: submit_command(["/bin/true"]))
    true-sh   the shell line TRUE_LINE through /bin/sh, its output captured:
              subprocess.run(TRUE_LINE, shell=True, capture_output=True) in a function
              (falconet: submit_command(TRUE_LINE))
    sleep     a function that sleeps sleep_ms milliseconds and returns its argument

Every system runs the same work for a workload: the commands of true-cmd and true-sh are
the same exec (one, or the shell and one) with stdout and stderr captured, everywhere.

Only the standard library is imported at module level; Parsl and Dask are imported
when a system is opened (install the peers with: pip install parsl dask distributed).

How the task functions reach the workers.  The harness loads this file under a name that is
not importable in a fresh interpreter (e.g. "falconet_bench_peers"), so:
  * processpool: with the fork start method the children inherit sys.modules and pickle's
    by-reference lookup works; with spawn/forkserver each worker first puts a directory on
    sys.path from which this module imports under its own name.
  * dask: each worker imports this module under its own name from a preload (script text)
    before taking tasks. (cloudpickle.register_pickle_by_value does not help with dask 2026.x:
    client.submit wraps the function in a Task that plain pickle serialises by reference.)
  * parsl: dill pickles the functions by reference; the worker pool's environment gets a
    PYTHONPATH entry from which this module imports under its own name (worker_init).
The task functions import what they use inside their bodies (as Parsl's docs require of
apps), so they also work when pickled by value from __main__.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.metadata
import importlib.util
import inspect
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol

SYSTEMS: tuple[str, ...] = ("processpool", "parsl-htex", "dask")
WORKLOADS: tuple[str, ...] = ("noop-fn", "true-cmd", "true-sh", "sleep")
TRUE_ARGV = ["/bin/true"]
#: a line that needs the shell (the ";"), so falconet cannot exec it directly either
TRUE_LINE = "/bin/true;"

LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# Task functions (module level, self-contained).

def noop(x):
    return x


def true_cmd(_i):
    import subprocess

    return subprocess.run(["/bin/true"], capture_output=True).returncode


def true_sh(_i):
    import subprocess

    return subprocess.run("/bin/true;", shell=True, capture_output=True).returncode


def sleep_task(x, sleep_ms):
    import time

    time.sleep(sleep_ms / 1000.0)
    return x


def _expected(workload: str, i: int) -> Any:
    return 0 if workload in ("true-cmd", "true-sh") else i


def _check(system: str, workload: str, n: int, results: list) -> None:
    if len(results) != n:
        raise AssertionError(f"{system} {workload}: {len(results)} results for {n} tasks")
    for i, r in enumerate(results):
        if r != _expected(workload, i):
            raise AssertionError(
                f"{system} {workload}: task {i} returned {r!r}, expected {_expected(workload, i)!r}")


# ---------------------------------------------------------------------------------------------
# What is installed.

def _version(dist: str) -> str | None:
    if importlib.util.find_spec(dist) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module(dist), "__version__", "unknown")


def available() -> dict[str, str]:
    """name -> version string for each system importable here."""
    out = {"processpool": platform.python_version()}
    parsl = _version("parsl")
    if parsl:
        out["parsl-htex"] = parsl
    dask, distributed = _version("dask"), _version("distributed")
    if dask and distributed:
        out["dask"] = distributed if dask == distributed else f"dask {dask}, distributed {distributed}"
    return out


# ---------------------------------------------------------------------------------------------
# Making this module importable by name in a fresh interpreter.

def _import_root(scratch: str) -> str | None:
    """A directory that, first on a fresh interpreter's sys.path, makes `import <__name__>` load
    this file; None when this module is __main__ (its functions are pickled by value then)."""
    if __name__ == "__main__":
        return None
    here = os.path.realpath(__file__)
    if __name__.startswith("falconet."):  # installed with falconet: importable as it is
        return scratch
    parts = __name__.split(".")
    stem = os.path.splitext(here)[0].split(os.sep)
    if stem[-len(parts):] == parts:  # e.g. benchmarks.peers -> the repository root
        return os.sep.join(stem[:-len(parts)]) or os.sep
    if len(parts) == 1:  # e.g. falconet_bench_peers -> a scratch dir with a link of that name
        link = os.path.join(scratch, __name__ + ".py")
        if not os.path.exists(link):
            os.symlink(here, link)
        return scratch
    raise RuntimeError(f"cannot make module {__name__!r} ({here}) importable on workers")


# ---------------------------------------------------------------------------------------------
# Runners.

class Runner(Protocol):
    startup_s: float

    def run(self, workload: str, n: int, sleep_ms: float = 0.0) -> float: ...

    def close(self) -> None: ...


class _Runner:
    """Start the system, time it until one warm-up task returns, then (untimed) wait until every
    worker has run a task, so the first run() does not pay for late workers."""

    name = "?"
    option_names: tuple[str, ...] = ()

    def __init__(self, workers: int, **options: Any):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        unknown = set(options) - set(self.option_names)
        if unknown:
            raise TypeError(f"{self.name}: unknown options {sorted(unknown)}; known: {self.option_names}")
        self.workers = workers
        self.options = options
        self.startup_s = math.nan  # start until one warm-up task has returned
        self.ready_s = math.nan    # start until all workers have run a task (extra, informative)
        self.import_s = 0.0        # importing the system's package (not part of startup_s)
        self._closed = False
        t0 = time.perf_counter()
        try:
            self._start()
            self._run_checked("noop-fn", 1, 0.0)
            self.startup_s = time.perf_counter() - t0
            self._wait_all_workers()
            self._run_checked("sleep", 2 * workers, 20.0)  # every worker imports/unpickles once
            self.ready_s = time.perf_counter() - t0
        except BaseException:
            try:
                self.close()
            except Exception:
                pass  # report why start-up failed, not a follow-on error in shutting down
            raise

    # -- per system
    def _start(self) -> None:
        raise NotImplementedError

    def _map(self, fn: Callable, workload: str, n: int, args: tuple) -> list:
        raise NotImplementedError

    def _wait_all_workers(self) -> None:
        pass

    def _shutdown(self) -> None:
        raise NotImplementedError

    def _function(self, workload: str) -> Callable:
        return {"noop-fn": noop, "true-cmd": true_cmd, "true-sh": true_sh, "sleep": sleep_task}[workload]

    # -- common
    def _run_checked(self, workload: str, n: int, sleep_ms: float) -> float:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")
        if self._closed:
            raise RuntimeError(f"{self.name} runner is closed")
        args = (sleep_ms,) if workload == "sleep" else ()
        fn = self._function(workload)
        t0 = time.perf_counter()
        results = self._map(fn, workload, n, args)
        elapsed = time.perf_counter() - t0
        _check(self.name, workload, n, results)
        return elapsed

    def run(self, workload: str, n: int, sleep_ms: float = 0.0) -> float:
        """Run n tasks, wait for all results; elapsed wall seconds. Raises AssertionError on a
        wrong result."""
        return self._run_checked(workload, n, sleep_ms)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{self.name} workers={self.workers} startup_s={self.startup_s:.3f}>"


class _ProcessPool(_Runner):
    name = "processpool"

    def _start(self) -> None:
        self._pool = None
        self._scratch = None
        kwargs: dict[str, Any] = {}
        if multiprocessing.get_start_method() != "fork" and __name__ != "__main__":
            import site

            self._scratch = tempfile.mkdtemp(prefix="falconet-peers-pool-")
            kwargs = {"initializer": site.addsitedir, "initargs": (_import_root(self._scratch),)}
        self._pool = cf.ProcessPoolExecutor(self.workers, **kwargs)

    def _map(self, fn, workload, n, args):
        submit = self._pool.submit
        futures = [submit(fn, i, *args) for i in range(n)]
        return [f.result() for f in futures]

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)


class _Dask(_Runner):
    name = "dask"

    def _start(self) -> None:
        self._cluster = self._client = None
        self._scratch = tempfile.mkdtemp(prefix="falconet-peers-dask-")
        t0 = time.perf_counter()
        import distributed

        self.import_s = time.perf_counter() - t0
        # Each worker imports this module under its own name before it takes tasks (a preload
        # given as script text), so functions travel by reference as with the other systems.
        # cloudpickle.register_pickle_by_value(this module) is not enough: client.submit wraps the
        # function in a Task that plain pickle serialises, and that pickles it by reference.
        root = _import_root(self._scratch)
        preload = ([f"import sys; sys.path.insert(0, {root!r}); import {__name__}"] if root else [])
        self._cluster = distributed.LocalCluster(
            n_workers=self.workers, threads_per_worker=1, processes=True,
            host=LOOPBACK, dashboard_address=None, worker_dashboard_address=None,
            # No dashboard; the scheduler's HTTP server (health, metrics) still starts, by
            # default on port 8787: take any free loopback port so parallel runs do not clash.
            scheduler_kwargs={"dashboard_address": f"{LOOPBACK}:0"},
            preload=preload)
        self._client = distributed.Client(self._cluster)

    def _wait_all_workers(self) -> None:
        self._client.wait_for_workers(self.workers, timeout=120)

    def _map(self, fn, workload, n, args):
        submit = self._client.submit
        futures = [submit(fn, i, *args, pure=False) for i in range(n)]
        return self._client.gather(futures)

    def _shutdown(self) -> None:
        try:
            if self._client is not None:
                self._client.close()
        finally:
            try:
                if self._cluster is not None:
                    self._cluster.close()
            finally:
                shutil.rmtree(self._scratch, ignore_errors=True)


def _cores_per_worker(workers: int) -> float:
    """HTEX starts min(max_workers_per_node, floor(cpu_count / cores_per_worker)) workers:
    keep the second term >= workers so exactly `workers` start even on a small machine."""
    cores = os.cpu_count() or 1
    cpw = min(1.0, cores / workers)
    while math.floor(cores / cpw) < workers:
        cpw = math.nextafter(cpw, 0.0)
    return cpw


class _ParslHtex(_Runner):
    name = "parsl-htex"
    label = "htex"
    # Library defaults unless given (see open_system): HighThroughputExecutor(encrypted=...),
    # Config(strategy_period=..., initialize_logging=...).
    option_names = ("encrypted", "strategy_period", "initialize_logging")

    def _start(self) -> None:
        self._dfk = None
        self._scratch = tempfile.mkdtemp(prefix="falconet-peers-parsl-")
        t0 = time.perf_counter()
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.executors.high_throughput import executor as htex_module
        from parsl.providers import LocalProvider

        self.import_s = time.perf_counter() - t0
        self._before = _descendants()

        root = _import_root(self._scratch)
        worker_init = f"export PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}" if root else ""
        provider = LocalProvider(nodes_per_block=1, init_blocks=1, min_blocks=1, max_blocks=1,
                                 worker_init=worker_init)

        params = inspect.signature(HighThroughputExecutor.__init__).parameters
        kw: dict[str, Any] = {
            "label": self.label,
            "provider": provider,
            # Never resolve the host name (a DNS query would leave this machine): the workers are
            # local, so bind and connect on loopback only.
            "address": LOOPBACK,
            "cores_per_worker": _cores_per_worker(self.workers),
            "prefetch_capacity": 0,  # one task per worker at a time (the default)
        }
        if self.options.get("encrypted") is not None:
            kw["encrypted"] = self.options["encrypted"]
        kw["max_workers_per_node" if "max_workers_per_node" in params else "max_workers"] = self.workers
        for loop in ("loopback_address", "interchange_address"):
            if loop in params:
                kw[loop] = LOOPBACK
        # The pool and interchange are console scripts found on PATH; a harness run as
        # /path/to/venv/bin/python without the venv activated would not find them.
        bindir = os.path.dirname(sys.executable)
        pool_script = os.path.join(bindir, "process_worker_pool.py")
        if shutil.which("process_worker_pool.py") is None and os.path.exists(pool_script):
            launch = getattr(htex_module, "DEFAULT_LAUNCH_CMD", None)
            if launch and launch.startswith("process_worker_pool.py"):
                kw["launch_cmd"] = launch.replace("process_worker_pool.py", shlex.quote(pool_script), 1)
        ic_script = os.path.join(bindir, "interchange.py")
        if ("interchange_launch_cmd" in params and shutil.which("interchange.py") is None
                and os.path.exists(ic_script)):
            kw["interchange_launch_cmd"] = [ic_script]
        htex = HighThroughputExecutor(**{k: v for k, v in kw.items() if k in params})

        config_kw = {k: self.options[k] for k in ("strategy_period", "initialize_logging")
                     if self.options.get(k) is not None}
        config = Config(executors=[htex], run_dir=os.path.join(self._scratch, "runinfo"),
                        retries=0, monitoring=None, **config_kw)
        self._dfk = parsl.load(config)
        self._apps = {
            "noop-fn": parsl.python_app(noop, data_flow_kernel=self._dfk, executors=[self.label]),
            # python apps that run the command, as everywhere: a bash_app would run every
            # command through bash without capturing its output
            "true-cmd": parsl.python_app(true_cmd, data_flow_kernel=self._dfk, executors=[self.label]),
            "true-sh": parsl.python_app(true_sh, data_flow_kernel=self._dfk, executors=[self.label]),
            "sleep": parsl.python_app(sleep_task, data_flow_kernel=self._dfk, executors=[self.label]),
        }

    def _function(self, workload: str) -> Callable:
        return self._apps[workload]

    def _wait_all_workers(self) -> None:
        htex = self._dfk.executors[self.label]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if sum(m.get("worker_count", 0) for m in htex.connected_managers()) >= self.workers:
                    return
            except Exception:
                return  # an older/newer parsl without this call: the priming tasks suffice
            time.sleep(0.05)
        raise TimeoutError(f"parsl-htex: {self.workers} workers did not connect in 120 s")

    def _map(self, fn, workload, n, args):
        futures = [fn(i, *args) for i in range(n)]
        return [f.result() for f in futures]

    def _shutdown(self) -> None:
        import parsl

        try:
            if self._dfk is not None:
                self._dfk.cleanup()
        finally:
            parsl.clear()
            # cleanup() terminates the interchange and cancels the block (kills the block's
            # process group). Sweep anything of ours still alive after a grace period: new
            # descendants (the interchange) and the block, which LocalProvider starts in the
            # background so that it is re-parented to init; it is found by the run_dir in its
            # command line, and its workers by process group.
            ours = (_descendants() - getattr(self, "_before", set())) | _block_processes(self._scratch)
            _reap(ours, grace=5.0)
            shutil.rmtree(self._scratch, ignore_errors=True)


def _descendants() -> set:
    """(pid, create_time) of this process's descendants (psutil is a falconet dependency)."""
    try:
        import psutil
    except ImportError:
        return set()
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            out.add((p.pid, p.create_time()))
        except psutil.Error:
            pass
    return out


def _block_processes(marker: str) -> set:
    """(pid, create_time) of processes whose command line mentions `marker`, plus their process
    groups (never ours) and descendants."""
    try:
        import psutil
    except ImportError:
        return set()
    mine = os.getpgrp()
    roots, groups = [], set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in (p.info["cmdline"] or ())):
                roots.append(p)
                pgid = os.getpgid(p.pid)
                if pgid != mine:
                    groups.add(pgid)
        except (psutil.Error, OSError):
            pass
    out = set()
    for p in roots:
        try:
            for q in [p, *p.children(recursive=True)]:
                out.add((q.pid, q.create_time()))
        except psutil.Error:
            pass
    if groups:
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) in groups:
                    out.add((p.pid, p.create_time()))
            except (psutil.Error, OSError):
                pass
    return out


def _reap(procs: set, grace: float) -> None:
    if not procs:
        return
    import psutil

    alive = []
    for pid, created in procs:
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=2.0)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


_RUNNERS = {"processpool": _ProcessPool, "parsl-htex": _ParslHtex, "dask": _Dask}


def open_system(name: str, workers: int, **options: Any) -> Runner:
    """Start `name` with exactly `workers` worker processes and return its Runner, once it has
    run a warm-up task on every worker. Raises ImportError if the system is not installed.

    The harness passes no options: each system runs with its library defaults. For what-if runs,
    parsl-htex takes encrypted=False (CurveZMQ is on by default in recent Parsl),
    strategy_period=seconds (the first block is only launched on the first strategy tick) and
    initialize_logging=False (Parsl writes DEBUG lines per task to runinfo/*/parsl.log)."""
    if name not in _RUNNERS:
        raise ValueError(f"unknown system {name!r}; expected one of {SYSTEMS}")
    if name not in available():
        missing = {"parsl-htex": "parsl", "dask": "dask distributed"}[name]
        raise ImportError(f"{name} is not installed (pip install {missing})")
    return _RUNNERS[name](workers, **options)


# ---------------------------------------------------------------------------------------------
# Smoke test.

def _smoke(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Open each available peer system and run each workload once.")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    a = ap.parse_args(argv)
    have = available()
    print(f"# python {platform.python_version()} on {platform.node()}, {os.cpu_count()} cores; "
          f"module {__name__}; available: {have}", flush=True)
    plan = (("noop-fn", 2000, 0.0), ("true-cmd", 300, 0.0), ("true-sh", 300, 0.0), ("sleep", 100, 10.0))
    for name in a.systems.split(","):
        if name not in have:
            print(f"{name:12} not installed", flush=True)
            continue
        before = _descendants()
        r = open_system(name, a.workers)
        try:
            print(f"{name:12} startup_s {r.startup_s:6.2f}  (all workers ready {r.ready_s:.2f} s, "
                  f"import {r.import_s:.2f} s)", flush=True)
            for workload, n, ms in plan:
                s = r.run(workload, n, sleep_ms=ms)
                print(f"{name:12} {workload:9} n={n:5}  {s:7.3f} s  {n / s:9.0f} tasks/s", flush=True)
        finally:
            r.close()
        time.sleep(0.5)
        left = _describe((_descendants() - before) | _block_processes("falconet-peers-"))
        print(f"{name:12} closed; processes left behind: {left or 'none'}", flush=True)
        # A leftover in the smoke output means close() failed; it would also skew later systems.


def _describe(procs: set) -> list[str]:
    try:
        import psutil
    except ImportError:
        return []
    out = []
    for pid, _ in sorted(procs):
        try:
            p = psutil.Process(pid)
            cmd = " ".join(p.cmdline())
            if p.status() == psutil.STATUS_ZOMBIE or "multiprocessing.resource_tracker" in cmd:
                continue  # the stdlib's per-interpreter tracker lives until this process exits
            out.append(f"{pid} {p.status()} {cmd[:80]}")
        except psutil.Error:
            pass
    return out


if __name__ == "__main__":
    # Load this file the way the harness does (by path, under another name) unless --as-main.
    if "--as-main" in sys.argv:
        sys.argv.remove("--as-main")
        _smoke()
    else:
        spec = importlib.util.spec_from_file_location("falconet_bench_peers", os.path.abspath(__file__))
        module = importlib.util.module_from_spec(spec)
        sys.modules["falconet_bench_peers"] = module
        spec.loader.exec_module(module)
        module._smoke()
