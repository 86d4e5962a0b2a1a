"""executor/boot.py: options become an ExecutorConfig; the idle shutdown runs only when asked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from falconet.executor import boot


def test_options_become_the_config_with_defaults_filled_in():
    cfg = boot.config(boot.Options(dispatcher="tcp://127.0.0.1:5556", cpus=4, memory_mb=2000, tags=("gpu",),
                                   facts={"instance_id": "i-1"}))
    assert (cfg.dispatcher, cfg.slots, cfg.cpus, cfg.memory_mb, cfg.tags) == ("tcp://127.0.0.1:5556", 4, 4, 2000,
                                                                              ("gpu",))
    assert cfg.idle_timeout_s == 0.0 and cfg.prefetch is None and cfg.facts == {"instance_id": "i-1"}
    assert boot.config(boot.Options(dispatcher="tcp://h:1", slots=2, cpus=8)).slots == 2
    with pytest.raises(ValueError):
        boot.config(boot.Options())


@pytest.mark.parametrize("asked,left_idle,code,ran", [
    (True, True, 0, True), (False, True, 0, False), (True, False, 0, False), (True, True, 1, False)])
def test_the_shutdown_command_runs_only_after_leaving_idle_when_the_user_data_asks(tmp_path, asked, left_idle,
                                                                                   code, ran):
    marker = tmp_path / "powered-off"
    boot.shut_down_if_asked(boot.Options(shutdown_when_idle=asked), SimpleNamespace(left_idle=left_idle), code,
                            f"touch {marker}")
    assert marker.exists() is ran


def test_no_shutdown_command_is_a_warning(caplog):
    boot.shut_down_if_asked(boot.Options(shutdown_when_idle=True), SimpleNamespace(left_idle=True), 0, "")
    assert "no --shutdown-command is set" in caplog.text
