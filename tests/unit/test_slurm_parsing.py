"""provisioner/slurm.py's parsing: Slurm's time forms, squeue's rows, and what a pilot
asks for.  Jobs against a real Slurm are in tests/integration/test_slurm.py."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from falconet.errors import FalconetError
from falconet.executor.boot import parse_slurm_time, slurm_job_end
from falconet.provisioner import slurm
from falconet.provisioner.policy import InstanceType


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 1800), ("1:30", 90), ("2:00:00", 7200), ("1-0", 86400), ("1-2:30", 95400),
    ("0-0:0:45", 45), (" 10 ", 600)])
def test_job_time_takes_sbatchs_forms(text, seconds):
    assert slurm.parse_job_time(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0:00", "UNLIMITED", "1h", "1:2:3:4", "-5", "1.5"])
def test_a_job_time_sbatch_would_not_take_or_that_never_ends_is_refused(text):
    with pytest.raises(FalconetError, match="--job-time"):
        slurm.parse_job_time(text)


@given(d=st.integers(0, 30), h=st.integers(0, 23), m=st.integers(0, 59), s=st.integers(0, 59))
def test_job_time_forms_agree(d, h, m, s):
    total = d * 86400 + h * 3600 + m * 60 + s
    if total:
        assert slurm.parse_job_time(f"{d}-{h}:{m:02d}:{s:02d}") == total
        assert slurm.parse_job_time(f"{d * 24 + h}:{m:02d}:{s:02d}") == total


def test_squeue_times_are_local_and_none_is_zero():
    when = datetime.datetime(2026, 12, 3, 22, 0, 0)
    assert parse_slurm_time("2026-12-03T22:00:00") == when.timestamp()
    for none in ("Unknown", "N/A", "NONE", ""):
        assert parse_slurm_time(none) == 0.0


def test_outside_a_slurm_job_there_is_no_end():
    assert slurm_job_end({}) == 0.0


def _backend(tmp_path, **kw) -> slurm.SlurmBackend:
    backend = slurm.SlurmBackend(slurm.SlurmSettings(cluster="c1", executor_address="tcp://10.0.0.1:5001",
                                                     log_dir=str(tmp_path), **kw))
    backend._types = (InstanceType("slurm:debug", 4, 8000, "x86_64", 0.0, 0, frozenset(), "local"),)
    return backend


def _row(job="17", state="RUNNING", comment="falconet:c1:c1-ab12-0001:2", nodes="node3") -> list[str]:
    return [job, state, comment, "2026-12-03T21:00:00", "2026-12-03T22:00:00", nodes, "None", "59:10"]


def test_a_row_of_this_fleet_becomes_a_machine_with_its_index_and_end(tmp_path):
    index, m = _backend(tmp_path)._machine(_row())
    assert index == 2 and m.id == "slurm-17" and m.state == "running" and m.launch_token == "c1-ab12-0001"
    assert m.address == "node3" and m.detail == "RUNNING on node3, 59:10 left"
    assert m.ends_at == parse_slurm_time("2026-12-03T22:00:00")
    _, queued = _backend(tmp_path)._machine(_row(state="PENDING", nodes=""))
    assert queued.state == "pending" and queued.ends_at == 0.0
    _, ended = _backend(tmp_path)._machine(_row(state="TIMEOUT"))
    assert ended.state == "ended" and ended.detail == "TIMEOUT"


@pytest.mark.parametrize("comment", ["", "falconet:c2:c2-ab12-0001:0", "other:c1:t:0", "falconet:c1::0",
                                     "falconet:c1:t:x", "falconet:c1", "falconet:c1.x:t:0", "falconet:c:1:t:0"])
def test_a_job_of_another_fleet_or_of_someone_else_is_never_ours(comment, tmp_path):
    assert _backend(tmp_path)._machine(_row(comment=comment)) is None


def test_a_pilot_asks_for_what_was_given_and_names_its_fleet(tmp_path):
    backend = _backend(tmp_path, partition="short", account="proj7", qos="high", job_time="0:30:00",
                       memory_per_job=2000, sbatch_options=("--constraint=avx2",), prologue="module load python")
    args = backend._sbatch_args("c1-ab12-0001", 3)
    assert {"--job-name=falconet-c1", "--comment=falconet:c1:c1-ab12-0001:3", "--time=0:30:00",
            "--cpus-per-task=4", "--mem=2000", "--partition=short", "--account=proj7", "--qos=high",
            "--constraint=avx2"} <= set(args)
    with open(backend._script("c1-ab12-0001", 3)) as fh:
        script = fh.read()
    assert script.startswith("#!/bin/sh\n") and "module load python\n" in script
    last = script.splitlines()[-1]
    assert last.startswith("exec ") and last.endswith("--id slurm-$SLURM_JOB_ID")
    assert "tcp://10.0.0.1:5001" in last and "--end-margin 60" in last and "--memory 2000" in last


@pytest.mark.parametrize("name", ["a,b", "a b", "a:b", "", "x/y"])
def test_a_cluster_name_slurm_could_not_filter_on_is_refused(name, tmp_path):
    """squeue -n takes a comma-separated list and the comment is split on colons: a name
    with those would hide the fleet's own jobs from it, and it would submit pilots forever."""
    with pytest.raises(FalconetError, match="--cluster"):
        slurm.SlurmBackend(slurm.SlurmSettings(cluster=name, executor_address="tcp://10.0.0.1:5001",
                                               log_dir=str(tmp_path)))
