"""falconet.parsl.task_options: a parsl_resource_specification into submit_python keywords."""

from __future__ import annotations

import pytest

pytest.importorskip("parsl", reason="Parsl is not installed: pip install '.[parsl]' (.ci/parsl.sh runs these tests)")

from parsl.executors.errors import InvalidResourceSpecification  # noqa: E402

from falconet.parsl import task_options  # noqa: E402


def test_parsl_keys_map_onto_needs_and_walltime():
    assert task_options({}) == {} and task_options(None) == {}
    assert task_options({"cores": 4, "memory": 8000, "disk": 100, "running_time_min": 2}) == {
        "cpus": 4, "memory": 8000, "walltime_s": 120.0}


def test_falconet_keys_pass_through():
    spec = {"tags": ["gpu"], "where": "cloud", "arch": "aarch64"}
    assert task_options(spec) == spec  # arch is normalised by the client, as for submit_python
    assert task_options({"prefer": "local"}) == {"prefer": "local"}


@pytest.mark.parametrize("spec, keys", [
    ({"cpus": 1}, {"cpus"}),
    ({"cores": 1, "gpus": 1, "priority": 3}, {"gpus", "priority"}),
])
def test_unknown_keys_are_refused(spec, keys):
    with pytest.raises(InvalidResourceSpecification) as info:
        task_options(spec)
    assert info.value.invalid_keys == keys


@pytest.mark.parametrize("spec, message", [
    ({"cores": 0}, "cpus must be"),
    ({"cores": 1.5}, "cpus must be"),
    ({"memory": -1}, "memory must be"),
    ({"where": "moon"}, "where must be"),
    ({"running_time_min": -1}, "running_time_min is minutes"),
    ({"running_time_min": "10"}, "running_time_min is minutes"),
])
def test_bad_values_are_refused(spec, message):
    with pytest.raises(InvalidResourceSpecification, match=message):
        task_options(spec)
