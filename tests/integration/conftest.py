"""Fixtures for integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_helpers import Cluster


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()
        print(c.logs())  # pytest shows this only when the test failed
