"""Helpers for the plugin's tests: a falconet cluster to point Snakemake at, and a wait."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import falconet

HERE = Path(__file__).parent


def wait_until(predicate: Callable[[], object], timeout_s: float = 60.0, what: str = "condition") -> object:
    """Poll predicate until it is true; fail the test with `what` if it never is."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def falconet_cluster() -> Iterator[falconet.LocalCluster]:
    """A dispatcher with one 2-slot executor, shared by the tests that name a dispatcher."""
    with falconet.LocalCluster(slots=2) as cluster:
        yield cluster


def snakemake_cmd(*args: str) -> list[str]:
    """The snakemake command line of this interpreter's environment."""
    return [sys.executable, "-m", "snakemake", *args]


def run_snakemake(workdir: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run snakemake in workdir to its end; its output is kept for the assertions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FALCONET_", "SNAKEMAKE_FALCONET_"))}
    return subprocess.run(snakemake_cmd(*args), cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
