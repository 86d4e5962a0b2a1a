"""The image recipe in ami/, checked offline: Packer, cloud-init and systemd validate it, and
the boot unit's own command line boots an executor from user-data served over IMDSv2.

The validators come from Debian's packages (packer, cloud-init, systemd), which .ci/run
installs; where one is missing its check is skipped, saying which package to install.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import wait_until

from falconet import spawn
from falconet.benchmarks.imds import ImdsServer
from falconet.userdata import UserData, with_cloud_config

AMI = Path(__file__).resolve().parents[2] / "ami"
UNIT = AMI / "falconet-executor.service"
PREFIX = "/opt/falconet/bin/falconet"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package}; .ci/run installs it)")
    return path


def test_packer_template_validates():
    packer = _tool("packer", "packer")
    run = subprocess.run([packer, "validate", "-var", "skip_region_validation=true",
                          "falconet-executor.pkr.hcl"], cwd=AMI, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_cloud_init_template_is_valid_and_carries_the_same_unit():
    cloud_init = _tool("cloud-init", "cloud-init")
    run = subprocess.run([cloud_init, "schema", "--config-file", str(AMI / "cloud-init.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((AMI / "cloud-init.yaml").read_text())
    files = {f["path"]: f for f in doc["write_files"]}
    assert files["/etc/systemd/system/falconet-executor.service"]["content"] == UNIT.read_text()
    assert files["/etc/sudoers.d/falconet"]["content"] == (AMI / "falconet-sudoers").read_text()
    assert files["/etc/sudoers.d/falconet"]["permissions"] == "0440"


def test_systemd_unit_verifies(tmp_path):
    analyze = _tool("systemd-analyze", "systemd")
    # The one change: the install prefix, so systemd finds the ExecStart program on this machine.
    falconet = Path(sys.executable).parent / "falconet"
    assert falconet.exists(), "the falconet command is not installed next to this interpreter"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(PREFIX, str(falconet)))
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    # verify exits 0 on directives it ignores, so any word from it is a finding
    assert run.returncode == 0 and not (run.stdout + run.stderr).strip(), run.stdout + run.stderr


def test_install_script_is_valid_shell():
    run = subprocess.run(["sh", "-n", str(AMI / "install.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _exec_start() -> list[str]:
    """The unit's ExecStart as argv, with its shutdown command."""
    line = next(ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[0] == PREFIX
    return argv


def _boot(cluster, user_data: str, tmp_path: Path, shutdown_marker: Path) -> tuple[subprocess.Popen, ImdsServer]:
    """Run the unit's command line (this interpreter's falconet) against a real IMDSv2."""
    argv = _exec_start()
    i = argv.index("--shutdown-command")
    assert argv[i + 1] == "sudo -n /usr/bin/systemctl poweroff"
    argv[i + 1] = f"touch {shutdown_marker}"  # never power off the machine running the tests
    imds = ImdsServer("i-0feedfacecafe0001", "c5.large", "us-east-1b", user_data.encode()).start()
    log = open(tmp_path / "executor.log", "ab")  # noqa: SIM115 - the child's
    proc = subprocess.Popen([*spawn.falconet(), *argv[1:], "--metadata-url", imds.url],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    cluster.procs["executor"] = proc
    return proc, imds


def test_unit_boots_an_executor_that_powers_off_when_idle(cluster, tmp_path):
    cluster.start_dispatcher()
    marker = tmp_path / "powered-off"
    ud = UserData(dispatcher=cluster.executor_address, cluster="demo", slots=2, idle_timeout_s=1.0,
                  shutdown_when_idle=True)
    proc, imds = _boot(cluster, ud.to_json(), tmp_path, marker)
    try:
        with cluster.client() as client:
            assert [f.result(timeout=60).exit_code for f in client.submit_commands(["true"] * 10)] == [0] * 10
            row = wait_until(lambda: [r for r in client.status(detail=True)["executor_table"]
                                      if r["id"] == "i-0feedfacecafe0001"], what="the executor's row")[0]
            assert row["slots"] == 2 and row["facts"]["availability_zone"] == "us-east-1b"
            assert proc.wait(timeout=60) == 0  # left after a second without work
            assert marker.exists()  # and ran the shutdown command, as the image would power off
    finally:
        imds.stop()


def test_multipart_user_data_from_the_cloud_init_template(cluster, tmp_path):
    cluster.start_dispatcher()
    marker = tmp_path / "powered-off"
    doc = UserData(dispatcher=cluster.executor_address, cluster="stock").to_json()
    user_data = with_cloud_config(doc, (AMI / "cloud-init.yaml").read_text())
    assert re.search(r"Content-Type: text/cloud-config", user_data)
    proc, imds = _boot(cluster, user_data, tmp_path, marker)
    try:
        with cluster.client() as client:
            futures = client.submit_commands(["echo stock"] * 5)
            assert {f.result(timeout=60).stdout for f in futures} == {"stock\n"}
            assert {f.result().executor for f in futures} == {"i-0feedfacecafe0001"}
        assert proc.poll() is None and not marker.exists()  # no idle timeout: it stays
    finally:
        imds.stop()
