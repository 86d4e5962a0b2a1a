"""parsl-perf, Parsl's own throughput benchmark, on falconet and on Parsl's HighThroughputExecutor.

    python benchmarks/parsl_perf.py [--workers 2] [--iterate 500,2000]

parsl-perf (``parsl.benchmark.perf``, shipped with Parsl) submits batches of a Python app
that returns at once and prints the tasks per second of each batch.  :func:`parsl_perf`
runs it twice in the same call, with the same batch sizes and worker count: once with a
FalconetExecutor on an embedded falconet cluster (`workers` slots), once with a
HighThroughputExecutor on a LocalProvider (`workers` workers), and returns the rate of
each one's last batch (the first ones warm up).  Each run is a fresh ``python -m
parsl.benchmark.perf`` process in a scratch folder, with a config file written there.

Needs Parsl in the interpreter that runs it (``pip install '.[parsl]'``); imports only the
standard library itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

LOOPBACK = "127.0.0.1"
_RATE = re.compile(r"^Tasks per second: ([0-9.]+)", re.MULTILINE)

FALCONET_CONFIG = """\
from parsl.config import Config
from falconet.parsl import FalconetExecutor

config = Config(executors=[FalconetExecutor(label="falconet", slots={workers})])
"""

# Parsl's own tests/configs/htex_local.py, on loopback, with exactly `workers` workers.
HTEX_CONFIG = """\
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SimpleLauncher
from parsl.providers import LocalProvider

config = Config(
    executors=[HighThroughputExecutor(
        label="htex", address="{loopback}", loopback_address="{loopback}",
        max_workers_per_node={workers}, cores_per_worker={cores_per_worker},
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, launcher=SimpleLauncher()),
    )],
    strategy="none",
)
"""


def _cores_per_worker(workers: int) -> float:
    """So that HTEX starts exactly `workers` workers on a machine of any size."""
    cores = os.cpu_count() or 1
    return min(1.0, cores / workers)


def run_one(config_text: str, iterate: str, python: str, timeout_s: float) -> dict:
    """One parsl-perf process on this config: {tasks_per_s (last batch), rates, wall_s, log}."""
    scratch = tempfile.mkdtemp(prefix="falconet-parsl-perf-")
    try:
        config = os.path.join(scratch, "config.py")
        with open(config, "w") as fh:
            fh.write(config_text)
        env = dict(os.environ)
        # HTEX starts process_worker_pool.py and interchange.py from PATH: this interpreter's.
        env["PATH"] = os.path.dirname(python) + os.pathsep + env.get("PATH", "")
        started = time.monotonic()
        proc = subprocess.run([python, "-m", "parsl.benchmark.perf", "--config", config, "--iterate", iterate],
                              cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout_s)
        wall_s = time.monotonic() - started
        rates = [float(r) for r in _RATE.findall(proc.stdout)]
        if proc.returncode != 0 or not rates:
            raise RuntimeError(f"parsl-perf failed (exit status {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return {"tasks_per_s": rates[-1], "rates": rates, "wall_s": round(wall_s, 2)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def parsl_perf(workers: int = 2, iterate: tuple[int, ...] = (500, 2000), python: str | None = None,
               timeout_s: float = 600.0) -> dict:
    """parsl-perf's tasks/s on falconet and on Parsl's HighThroughputExecutor, same batches.

    Returns {"falconet": tasks/s, "htex": tasks/s, "runs": {name: details}, "parsl": version,
    "workers": workers, "iterate": [batch sizes]}.
    """
    python = python or sys.executable
    sizes = ",".join(str(n) for n in iterate)
    configs = {
        "falconet": FALCONET_CONFIG.format(workers=workers),
        "htex": HTEX_CONFIG.format(workers=workers, loopback=LOOPBACK,
                                   cores_per_worker=_cores_per_worker(workers)),
    }
    runs = {name: run_one(text, sizes, python, timeout_s) for name, text in configs.items()}
    version = subprocess.run([python, "-c", "import parsl; print(parsl.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return {"falconet": runs["falconet"]["tasks_per_s"], "htex": runs["htex"]["tasks_per_s"],
            "runs": runs, "parsl": version, "workers": workers, "iterate": list(iterate)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="parsl-perf on falconet and on Parsl's HighThroughputExecutor")
    parser.add_argument("--workers", type=int, default=2, help="falconet slots and HTEX workers (2)")
    parser.add_argument("--iterate", default="500,2000", help="parsl-perf batch sizes (500,2000)")
    args = parser.parse_args(argv)
    sizes = tuple(int(n) for n in args.iterate.split(","))
    print(json.dumps(parsl_perf(args.workers, sizes), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
