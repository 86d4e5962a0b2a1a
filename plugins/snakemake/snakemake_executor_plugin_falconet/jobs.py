"""What a Snakemake job asks falconet for: one pure function from a job's threads and
resources to the options of ``Client.submit_command``, and one from a finished future to
the job's outcome.

| Snakemake                      | falconet task                                  |
|--------------------------------|------------------------------------------------|
| ``threads``                    | ``cpus``                                       |
| ``resources: mem_mb``          | ``memory`` (MB)                                |
| ``resources: runtime`` (min)   | ``walltime_s`` (seconds; the command is killed) |
| ``resources: falconet_tags``   | ``tags`` (words split on commas and spaces)    |
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TAGS_RESOURCE = "falconet_tags"
STDERR_TAIL_LINES = 20  #: lines of a failed job's stderr shown in Snakemake's error message


def task_options(threads: int, resources: Mapping[str, Any], max_cpus: int | None = None) -> dict[str, Any]:
    """The submit_command keywords for a job with these threads and resources.

    max_cpus: the most cpus any executor offers, when known (an embedded cluster): threads
    beyond it are capped, as Snakemake caps them at --cores when it runs jobs itself.
    Resources that are not numbers yet (Snakemake's unevaluated placeholders) are ignored.
    """
    cpus = max(1, _whole(threads) or 1)
    if max_cpus is not None:
        cpus = min(cpus, max_cpus)
    options: dict[str, Any] = {"cpus": cpus}
    memory = _whole(resources.get("mem_mb"))
    if memory:
        options["memory"] = memory
    runtime_min = _number(resources.get("runtime"))
    if runtime_min:
        options["walltime_s"] = runtime_min * 60.0
    tags = parse_tags(resources.get(TAGS_RESOURCE))
    if tags:
        options["tags"] = tags
    return options


def parse_tags(value: Any) -> list[str]:
    """Tags from a resource value: 'gpu,rack=b7' or 'gpu rack=b7' (empty: none)."""
    if not isinstance(value, str):
        return []
    return [t for t in re.split(r"[,\s]+", value) if t]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job's future ended: ok, or failed with a message for Snakemake's error report."""

    ok: bool
    message: str = ""
    log: str = ""  #: the command's stdout and stderr, for the job's log file


def outcome(fut: cf.Future) -> Outcome:
    """The outcome of a done command future (cancelled, raised, or a CommandResult)."""
    if fut.cancelled():
        return Outcome(False, "falconet cancelled the job before it started. ")
    exc = fut.exception()
    if exc is not None:  # TaskError: no outcome (executor lost past its retries, unschedulable)
        return Outcome(False, f"falconet could not run the job: {exc}. ")
    result = fut.result()
    if result.ok:
        return Outcome(True)
    log = f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    tail = "\n".join(result.stderr.rstrip().splitlines()[-STDERR_TAIL_LINES:])
    where = f" on executor {result.executor}" if result.executor else ""
    message = f"falconet: the job failed{where} ({result.reason or f'exit code {result.exit_code}'})"
    message += f"; the end of its stderr:\n{tail}\n" if tail else ". "
    return Outcome(False, message, log)


def _number(value: Any) -> float:
    """A positive finite number, or 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) and value > 0 else 0.0


def _whole(value: Any) -> int:
    """A positive number rounded up to a whole one, or 0."""
    number = _number(value)
    return math.ceil(number) if number else 0
