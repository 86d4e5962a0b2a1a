"""A Snakemake workflow of a few hundred jobs, on falconet and on Snakemake's own local
executor: the wall time of each, same workflow, same machine.

    python benchmarks/snakemake_flow.py [--samples 70] [--cores 2] [--python PATH]

The harness imports this file by path and calls only:

    available(python) -> version or None   Snakemake and the falconet plugin importable there
    run(samples, cores, python, group_components) -> {name: value}   (below)

The workflow: per sample, ``generate -> square -> total`` (three tiny shell jobs), and one
``summary`` of all totals: ``3 * samples + 2`` jobs with ``all``.  Each configuration runs in
a fresh directory from nothing, with the outputs checked, and is timed around the whole
``snakemake`` command (start-up, the DAG, the jobs, and for falconet the embedded cluster's
start and stop):

    local_s            snakemake --cores CORES
    falconet_s         snakemake --executor falconet --jobs 4*CORES --falconet-slots CORES
    falconet_grouped_s the same with each sample's jobs grouped, GROUP_COMPONENTS samples
                       per falconet task (--groups, --group-components); only when
                       group_components > 0

Snakemake runs every job of a remote executor as its own ``python -m snakemake`` process
(about 2 s of CPU before the rule's command starts), which is what the ungrouped run
pays per job; grouping is Snakemake's way to amortise it.  Only the standard library is
imported here: Snakemake runs in the interpreter given as ``python`` (default: this one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SNAKEFILE = """\
SAMPLES = list(range(int(config["samples"])))

rule all:
    input: "summary.txt"

rule generate:
    output: "data/{s}.txt"
    shell: "seq 1 $(( {wildcards.s} + 1 )) > {output}"

rule square:
    input: "data/{s}.txt"
    output: "squared/{s}.txt"
    shell: "awk '{{ print $1 * $1 }}' {input} > {output}"

rule total:
    input: "squared/{s}.txt"
    output: "totals/{s}.txt"
    shell: "awk '{{ t += $1 }} END {{ print t }}' {input} > {output}"

rule summary:
    input: expand("totals/{s}.txt", s=SAMPLES)
    output: "summary.txt"
    shell: "cat {input} > {output}"
"""


def available(python: str | None = None) -> str | None:
    """Snakemake's version in that interpreter, if it has Snakemake and the falconet plugin."""
    probe = ("import importlib.metadata as m, snakemake_executor_plugin_falconet; "
             "print(m.version('snakemake'))")
    done = subprocess.run([python or sys.executable, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def run(samples: int = 70, cores: int = 2, python: str | None = None, group_components: int = 35) -> dict:
    """Run the workflow each way; {"jobs", "local_s", "falconet_s"[, "falconet_grouped_s"]}."""
    python = _resolve(python or sys.executable)
    if available(python) is None:
        raise RuntimeError(f"{python} cannot import snakemake and snakemake_executor_plugin_falconet; "
                           "install them there: pip install snakemake ./plugins/snakemake")
    common = ["--config", f"samples={samples}"]
    falconet = ["--executor", "falconet", "--jobs", str(4 * cores), "--falconet-slots", str(cores)]
    runs = {"local_s": ["--cores", str(cores)], "falconet_s": falconet}
    if group_components > 0:
        runs["falconet_grouped_s"] = [*falconet, "--groups", "generate=sample", "square=sample",
                                      "total=sample", "--group-components", f"sample={group_components}"]
    result: dict = {"jobs": 3 * samples + 2, "samples": samples, "cores": cores}
    for name, args in runs.items():
        result[name] = round(_timed_run(python, [*args, *common], samples), 2)
    return result


def _resolve(python: str) -> str:
    """An interpreter path that still works from the runs' own directories."""
    return os.path.abspath(python) if os.sep in python else (shutil.which(python) or python)


def _timed_run(python: str, args: list[str], samples: int) -> float:
    """Wall seconds of one snakemake run from nothing, its outputs checked."""
    workdir = tempfile.mkdtemp(prefix="falconet-bench-snakemake-")
    try:
        with open(os.path.join(workdir, "Snakefile"), "w") as fh:
            fh.write(SNAKEFILE)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FALCONET_", "SNAKEMAKE_FALCONET_"))}
        start = time.perf_counter()
        done = subprocess.run([python, "-m", "snakemake", "--quiet", "all", *args], cwd=workdir, env=env,
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        _check(workdir, samples)
        return elapsed
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _check(workdir: str, samples: int) -> None:
    with open(os.path.join(workdir, "summary.txt")) as fh:
        got = [int(x) for x in fh.read().split()]
    want = [sum(i * i for i in range(1, s + 2)) for s in range(samples)]
    if got != want:
        raise RuntimeError(f"wrong summary in {workdir}: {got[:5]}... instead of {want[:5]}...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=70, help="samples (3 jobs each) [70]")
    parser.add_argument("--cores", type=int, default=2, help="--cores of the local run, slots of falconet's [2]")
    parser.add_argument("--python", default=None, help="an interpreter with snakemake and the plugin [this one]")
    parser.add_argument("--group-components", type=int, default=35,
                        help="samples per falconet task in the grouped run (0: no grouped run) [35]")
    args = parser.parse_args()
    print(json.dumps(run(args.samples, args.cores, args.python, args.group_components)))


if __name__ == "__main__":
    main()
