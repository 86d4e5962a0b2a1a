"""falconet's children import the installed falconet, whatever folder the user is in.

Run from a clone's root, `python -m falconet` would import the source folder ./falconet,
whose subpackages live in other folders (dispatcher/, executor/...): the quick start failed
there with "No module named 'falconet.provisioner'" after a non-editable install.  Here a
folder with a broken ./falconet stands for that shadow.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import falconet
from falconet import spawn


@pytest.fixture
def shadowed(tmp_path: Path) -> Path:
    """A working directory whose ./falconet is not the real package."""
    (tmp_path / "falconet").mkdir()
    (tmp_path / "falconet" / "__init__.py").write_text("raise ImportError('the shadow in the cwd was imported')\n")
    (tmp_path / "falconet" / "__main__.py").write_text("raise SystemExit('the shadow in the cwd ran')\n")
    return tmp_path


def test_children_ignore_a_falconet_folder_in_the_working_directory(shadowed: Path) -> None:
    for argv in (spawn.falconet("--version"), spawn.module("falconet.executor.slot", "--help"),
                 spawn.code("import falconet.provisioner, sys; print(falconet.__file__)")):
        run = subprocess.run(argv, cwd=shadowed, capture_output=True, text=True, timeout=60)
        assert "shadow" not in run.stdout + run.stderr, (argv, run.stderr)
    run = subprocess.run(spawn.code("import falconet; print(falconet.__file__)"), cwd=shadowed,
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == falconet.__file__


def test_an_embedded_cluster_starts_from_such_a_folder(shadowed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(shadowed)
    with falconet.local(slots=1) as client:
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
