"""Workflow engines on falconet against their own schedulers: the same graph, the same work.

`falconet bench --only engines` runs :func:`run`.  Each engine has one self-contained
function (it imports its engine itself) that returns its figures, or ``{"skipped": why}``
when the engine is not installed, and one line of text in :func:`lines`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Iterator
from typing import Any


def run(quick: bool) -> dict:
    """Every engine's figures (the harness's `engines` workload)."""
    return {"dask": dask_graph(1000 if quick else 10_000),
            "parsl": parsl_perf((100, 300) if quick else (500, 2000)),
            "snakemake": snakemake_flow(4 if quick else 70)}


def parsl_perf(iterate: tuple[int, ...]) -> dict:
    """parsl-perf on falconet and on Parsl's HighThroughputExecutor (benchmarks/parsl_perf.py)."""
    if importlib.util.find_spec("parsl") is None:
        return {"skipped": "parsl is not installed: pip install '.[parsl]'"}
    from falconet.benchmarks import parsl_perf as pp

    r = pp.parsl_perf(workers=2, iterate=iterate)
    return {k: r[k] for k in ("falconet", "htex", "parsl", "workers", "iterate")}


def snakemake_flow(samples: int) -> dict:
    """A Snakemake workflow on falconet and on `snakemake --cores 2` (benchmarks/snakemake_flow.py)."""
    from falconet.benchmarks import snakemake_flow as sf

    version = sf.available()
    if version is None:
        return {"skipped": "snakemake and its falconet plugin are not installed here: "
                           "pip install snakemake ./plugins/snakemake"}
    return {"version": version, **sf.run(samples, cores=2, group_components=max(1, samples // 2))}


def lines(r: dict) -> list[str]:
    """The summary lines of run()'s figures."""
    out = []
    d = r.get("dask")
    if d is not None:
        if "skipped" in d:
            out.append(f"dask: skipped ({d['skipped']})")
        else:
            out.append(f"dask {d['version']}, delayed graph of {d['tasks']:,} tasks on {d['slots']} slots: "
                       f"falconet {d['falconet_tasks_per_s']:,.0f} tasks/s ({d['falconet_s']:.2f}s), "
                       f"distributed.LocalCluster {d['distributed_tasks_per_s']:,.0f} tasks/s "
                       f"({d['distributed_s']:.2f}s); start-up {d['falconet_startup_s']:.2f}s vs "
                       f"{d['distributed_startup_s']:.2f}s")
    p = r.get("parsl")
    if p is not None:
        out.append(f"parsl: skipped ({p['skipped']})" if "skipped" in p else
                   f"parsl-perf (parsl {p['parsl']}, {p['workers']} workers, batches {p['iterate']}): "
                   f"falconet {p['falconet']:,.0f} tasks/s, HighThroughputExecutor {p['htex']:,.0f} tasks/s")
    m = r.get("snakemake")
    if m is not None:
        out.append(f"snakemake: skipped ({m['skipped']})" if "skipped" in m else
                   f"snakemake {m['version']}, workflow of {m['jobs']} jobs: --cores {m['cores']} {m['local_s']:.1f}s, "
                   f"falconet {m['falconet_s']:.1f}s, falconet grouped {m.get('falconet_grouped_s', 0):.1f}s")
    return out


# ---------------------------------------------------------------- Dask


def _leaf(i: int) -> int:
    """One unit of the graph's work: tiny, so the figure is the scheduling cost."""
    return i * 2


def _total(values: list[int]) -> int:
    return sum(values)


def _dask_graph_of(n_tasks: int) -> Any:
    """n_tasks - 1 independent leaves and the one task that sums them."""
    import dask

    return dask.delayed(_total)([dask.delayed(_leaf)(i) for i in range(n_tasks - 1)])


def dask_graph(n_tasks: int = 10_000, slots: int = 2) -> dict:
    """One delayed graph of n_tasks tasks, computed through falconet (falconet.local(slots)
    and ``scheduler=client.executor()``) and through Dask's own
    ``distributed.LocalCluster(n_workers=slots, threads_per_worker=1)`` (processes).
    Start-up is timed apart from the compute; both answers are checked."""
    if importlib.util.find_spec("dask") is None or importlib.util.find_spec("distributed") is None:
        return {"skipped": "dask and distributed are not installed: pip install '.[dask]'"}
    import dask
    import distributed

    import falconet

    expected = sum(2 * i for i in range(n_tasks - 1))
    out: dict[str, Any] = {"version": dask.__version__, "tasks": n_tasks, "slots": slots}

    @contextlib.contextmanager
    def on_falconet() -> Iterator[Any]:
        with falconet.local(slots=slots) as client:
            yield client.executor()

    @contextlib.contextmanager
    def on_distributed() -> Iterator[Any]:
        with distributed.LocalCluster(n_workers=slots, threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                distributed.Client(cluster) as dclient:
            yield dclient

    for name, start in (("falconet", on_falconet), ("distributed", on_distributed)):
        t0 = time.perf_counter()
        with start() as scheduler:
            out[f"{name}_startup_s"] = time.perf_counter() - t0
            graph = _dask_graph_of(n_tasks)
            t1 = time.perf_counter()
            (got,) = dask.compute(graph, scheduler=scheduler)
            out[f"{name}_s"] = time.perf_counter() - t1
        if got != expected:
            raise RuntimeError(f"the Dask graph on {name} computed {got}, not {expected}")

    out["falconet_tasks_per_s"] = n_tasks / out["falconet_s"]
    out["distributed_tasks_per_s"] = n_tasks / out["distributed_s"]
    return out
