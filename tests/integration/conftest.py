"""Fixtures for integration tests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cluster_helpers import Cluster

from falconet.benchmarks.slurmsim import SlurmCluster, unavailable


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()
        print(c.logs())  # pytest shows this only when the test failed


@pytest.fixture(scope="module")
def moto_url():
    """moto's server (S3, EC2...) on a free loopback port, for the module's tests."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def slurm():
    """One real single-node Slurm (munged, slurmctld, slurmd) for the whole session."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        yield cluster
