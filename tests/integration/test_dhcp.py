"""DHCP-learned addresses, for real (needs root): executors in their own network namespaces
lease addresses from dnsmasq over a bridge, register with them, and run tasks.

    server ns:  bridge fnbrTAG 10.213.X.1/24; dnsmasq (DHCP only) and the dispatcher on it
      |-- veth -- client ns a: udhcpc leases 10.213.X.?, then executor exec-a starts
      `-- veth -- client ns b: udhcpc leases 10.213.X.?, then executor exec-b starts

TAG and X are random per run, so parallel runs never collide.  No route beyond the /24 is
installed anywhere, so nothing leaves the namespaces.  The test process stays in the root
namespace and talks to the dispatcher through dhcp_client.py, run inside the server ns.
Skipped, saying why, where namespaces cannot be made: not root, a tool missing, or
`ip netns add` refused.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_helpers import read_addresses, read_logs, stop_processes, wait_until

from falconet import spawn

CLIENT_SCRIPT = Path(__file__).with_name("dhcp_client.py")
EXECUTORS = {"exec-a": "a", "exec-b": "b"}  # executor id -> client namespace suffix
N_TASKS = 20
INET = re.compile(r"\binet (\d+\.\d+\.\d+\.\d+)/")

# udhcpc runs this on each event with the lease in its environment (ip, mask, interface, ...).
# Only the address is applied: Debian's default script would also add a default route and
# rewrite /etc/resolv.conf, which `ip netns exec` shares with the host.
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface" ;;
  bound|renew) ip -4 addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
esac
"""


def _ip(*args: str) -> str:
    """Run ip(8); raise CalledProcessError (with its stderr) on failure."""
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10).stdout


def _require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: it creates network namespaces, a bridge and veth pairs")
    for tool, package in (("ip", "iproute2"), ("dnsmasq", "dnsmasq-base"), ("busybox", "busybox")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {package}; .ci/run installs it)")
    applets = subprocess.run(["busybox", "--list"], capture_output=True, text=True).stdout.split()
    if "udhcpc" not in applets:
        pytest.skip("this busybox has no udhcpc applet (Debian package busybox or udhcpc)")


@dataclass(frozen=True)
class Host:
    """A client namespace and its end of the veth pair."""

    ns: str
    veth: str
    mac: str


class DhcpLab:
    """One run's namespaces, bridge and processes; stop() removes all of it."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.tag = secrets.token_hex(3)
        self.prefix = f"fnet-{self.tag}-"
        self.server = self.prefix + "srv"
        self.bridge = f"fnbr{self.tag}"  # interface names: at most 15 characters
        self.net = f"10.213.{random.randrange(256)}"
        self.gateway = f"{self.net}.1"
        self.namespaces: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}

    def add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)  # only once made: never delete another run's namespace
        _ip("-n", name, "link", "set", "lo", "up")

    def spawn(self, name: str, ns: str, argv: list[str], stdout: int | None = None) -> subprocess.Popen:
        """Start argv inside ns in its own process group, stderr (and stdout) to name.log."""
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                stdout=log if stdout is None else stdout, stderr=log,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_dhcp_server(self) -> None:
        """The bridge in the server namespace, and dnsmasq serving DHCP on it alone."""
        _ip("-n", self.server, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", self.server, "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("-n", self.server, "link", "set", self.bridge, "up")
        self.spawn("dnsmasq", self.server, [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--no-resolv", "--no-hosts",
            f"--interface={self.bridge}", "--bind-interfaces", "--user=root",
            f"--dhcp-range={self.net}.10,{self.net}.200,255.255.255.0,12h",
            # Without this dnsmasq pings each address before offering it: 3 s per lease.
            "--no-ping",
            f"--dhcp-leasefile={self.tmp / 'leases'}", f"--pid-file={self.tmp / 'dnsmasq.pid'}",
            "--log-dhcp", "--log-facility=-",
        ])
        # udhcpc's first discover is lost if it comes before dnsmasq listens.
        wait_until(lambda: "sockets bound exclusively" in self.log("dnsmasq") or self.procs["dnsmasq"].poll(),
                   timeout_s=10, what="dnsmasq to listen")
        assert self.procs["dnsmasq"].poll() is None, f"dnsmasq exited:\n{self.log('dnsmasq')}"

    def add_host(self, suffix: str) -> Host:
        """A client namespace wired to the bridge by a veth pair, its link up, no address yet."""
        ns = self.prefix + suffix
        veth, peer = f"fnv{self.tag}{suffix}", f"fnp{self.tag}{suffix}"
        self.add_namespace(ns)
        _ip("link", "add", veth, "netns", ns, "type", "veth", "peer", "name", peer, "netns", self.server)
        _ip("-n", self.server, "link", "set", peer, "master", self.bridge, "up")
        _ip("-n", ns, "link", "set", veth, "up")
        mac = json.loads(_ip("-n", ns, "-j", "link", "show", "dev", veth))[0]["address"]
        return Host(ns, veth, mac)

    def lease(self, hosts: list[Host]) -> None:
        """Run udhcpc in every host at once until each holds a lease (-q: then exit)."""
        script = self.tmp / "udhcpc.sh"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o700)
        procs = [self.spawn(f"udhcpc-{h.ns}", h.ns, [
            "busybox", "udhcpc", "-i", h.veth, "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", str(script),
        ]) for h in hosts]
        for h, proc in zip(hosts, procs):
            assert proc.wait(timeout=15) == 0, f"no lease in {h.ns}:\n{self.log(f'udhcpc-{h.ns}')}"

    def leases(self) -> dict[str, str]:
        """dnsmasq's lease file as MAC -> IPv4 address."""
        lines = (self.tmp / "leases").read_text().splitlines()
        return {fields[1]: fields[2] for fields in map(str.split, lines)}

    def global_ipv4(self, host: Host) -> list[str]:
        """The IPv4 addresses of global scope the host's veth holds."""
        links = json.loads(_ip("-n", host.ns, "-j", "-4", "addr", "show", "dev", host.veth, "scope", "global"))
        return [a["local"] for link in links for a in link["addr_info"]]

    def start_dispatcher(self) -> tuple[str, str]:
        """The dispatcher on the bridge address; returns its (client, executor) addresses."""
        proc = self.spawn("dispatcher", self.server, [
            *spawn.falconet(), "dispatcher", "--host", self.gateway, "--insecure",
            "--client-port", "0", "--executor-port", "0", "--log-level", "debug",
        ], stdout=subprocess.PIPE)
        return read_addresses(proc)

    def start_executor(self, executor_id: str, host: Host, dispatcher: str) -> None:
        # --prefetch 0: each executor holds only the task it runs, so both get some.
        self.spawn(executor_id, host.ns, [
            *spawn.falconet(), "executor", "--dispatcher", dispatcher, "--id", executor_id,
            "--slots", "1", "--prefetch", "0", "--log-level", "debug",
        ])

    def run_client(self, client_address: str, timeout_s: float = 20.0) -> dict:
        """dhcp_client.py inside the server namespace: who registered how, and who ran what."""
        run = subprocess.run(["ip", "netns", "exec", self.server, sys.executable, str(CLIENT_SCRIPT),
                              client_address, ",".join(EXECUTORS), str(N_TASKS), str(timeout_s)],
                             capture_output=True, text=True, timeout=timeout_s + 30)
        assert run.returncode == 0, f"dhcp_client.py exited {run.returncode}:\n{run.stdout}{run.stderr}"
        return json.loads(run.stdout)

    def stop(self) -> None:
        """Kill every process group, then delete the namespaces (which takes their links along)."""
        stop_processes(self.procs.values())
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def leftovers(self) -> list[str]:
        """Anything of this run still present: namespaces, root-namespace links, live processes."""
        netns = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
        links = [line.split(":")[1].strip() for line in _ip("-o", "link").splitlines()]
        return ([f"namespace {n}" for n in netns if n.startswith(self.prefix)]
                + [f"link {name}" for name in links if self.tag in name]
                + [f"process {name}" for name, p in self.procs.items() if p.poll() is None])

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return read_logs(self.tmp)


@pytest.fixture
def lab(tmp_path: Path):
    _require_root_and_tools()
    lab = DhcpLab(tmp_path)
    try:
        try:
            lab.add_namespace(lab.server)
            _ip("netns", "exec", lab.server, "true")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create a network namespace here: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
        yield lab
    finally:
        lab.stop()
        print(lab.logs())  # pytest shows this only when the test failed
        left = lab.leftovers()
        assert not left, f"cleanup left behind: {left}"


def test_executors_register_with_their_dhcp_leases_and_run_tasks(lab):
    lab.start_dhcp_server()
    hosts = {eid: lab.add_host(suffix) for eid, suffix in EXECUTORS.items()}
    lab.lease(list(hosts.values()))

    leases = lab.leases()
    assert sorted(leases) == sorted(h.mac for h in hosts.values()), f"lease file: {leases}"
    leased = {eid: leases[h.mac] for eid, h in hosts.items()}
    assert len(set(leased.values())) == len(hosts)
    for eid, host in hosts.items():
        assert lab.global_ipv4(host) == [leased[eid]], f"{host.ns} does not hold its lease alone"

    client_address, executor_address = lab.start_dispatcher()
    assert executor_address.startswith(f"tcp://{lab.gateway}:")
    for eid, host in hosts.items():
        lab.start_executor(eid, host, executor_address)
    report = lab.run_client(client_address)

    # What the dispatcher recorded at registration: each executor's own lease, not the other's.
    seen = {row["id"]: row["addresses"] for row in report["executor_table"]}
    assert set(seen) == set(hosts)
    for eid, addresses in seen.items():
        ipv4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
        assert ipv4 == [leased[eid]], f"{eid} registered with {addresses}, leased {leased[eid]}"

    # Every task succeeded, both executors ran some, and each ran where its lease is.
    assert [t["exit_code"] for t in report["tasks"]] == [0] * N_TASKS, report["tasks"]
    ran_on: dict[str, set[str]] = defaultdict(set)
    for task in report["tasks"]:
        ran_on[task["executor"]].update(INET.findall(task["stdout"]))
    assert ran_on == {eid: {ip} for eid, ip in leased.items()}
