#!/usr/bin/env bash
# The Snakemake executor plugin (plugins/snakemake), from scratch on a fresh clone: a
# virtual environment of its own with falconet, Snakemake and the plugin installed as a
# user would (non-editable), then the plugin's tests: Snakemake's generic executor tests
# and real workflows through the snakemake command line.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .ci-venv-snakemake
. .ci-venv-snakemake/bin/activate
python -m pip install --quiet --upgrade pip
pip install --quiet . ./plugins/snakemake 'snakemake>=9.6.2,<10' pytest pytest-timeout
# The tests import the plugin as installed, not from the source folder next to them.
cd plugins/snakemake
pytest tests  # not python -m pytest: that would put the source folder on sys.path
