"""A small EC2 on loopback for tests and benchmarks: moto's API server and a hypervisor.

moto in server mode plays EC2's API: it records instances, their tags and user-data, but
runs nothing.  :class:`Hypervisor` plays the rest of the cloud for one cluster: once an
instance is running it "boots" it, which means serving the instance its own IMDSv2
(:mod:`falconet.benchmarks.imds`) and starting ``falconet executor
--from-instance-metadata`` against it, as the executor baked into the image does; once the
instance is terminated or stopped it powers the executor off (SIGTERM, then SIGKILL).

Every address is 127.0.0.1, and every process gets AWS_EC2_METADATA_DISABLED=true so that
boto3 never probes the real metadata service.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falconet import spawn
from falconet.benchmarks.imds import ImdsServer
from falconet.provisioner.ec2 import CLUSTER_TAG, LIVE_STATES

log = logging.getLogger("falconet.benchmarks.ec2sim")

REGION = "us-east-1"
IMAGE_NAME = "falconet-executor-test"  #: matches the provisioner's default --ami name:falconet-executor-*
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


class MotoEc2:
    """moto's EC2 API on a free loopback port, with an executor image registered.

    moto keeps its state per process, not per server: every server in the process sees the
    same instances, so tests tell their fleets apart by cluster, and a second server (or one
    restarted on the same ``port``) is the same cloud behind an endpoint that can go down.
    """

    def __init__(self, port: int = 0) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # else one line per API call
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.port = port
        self.url = ""
        self.image_id = ""
        self.ec2: Any = None  #: a client shared by this object's helpers (boto3 clients are thread-safe)

    def start(self) -> MotoEc2:
        """Serve, and find or register the image named IMAGE_NAME."""
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.url = f"http://{host}:{self.port}"
        self.ec2 = self.client()
        found = self.ec2.describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [IMAGE_NAME]}])["Images"]
        self.image_id = found[0]["ImageId"] if found else self.ec2.register_image(
            Name=IMAGE_NAME, Architecture="x86_64", RootDeviceName="/dev/xvda",
            VirtualizationType="hvm")["ImageId"]
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()

    def __enter__(self) -> MotoEc2:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A new boto3 EC2 client for this server, with fake keys passed explicitly."""
        import boto3

        session = boto3.session.Session(region_name=REGION, aws_access_key_id=FAKE_KEYS["AWS_ACCESS_KEY_ID"],
                                        aws_secret_access_key=FAKE_KEYS["AWS_SECRET_ACCESS_KEY"])
        return session.client("ec2", endpoint_url=self.url)

    def env(self, credentials: bool = True) -> dict[str, str]:
        """Environment for a process that talks to this server (a provisioner), from os.environ.

        Every AWS_* and proxy variable of this process is dropped, so no real profile, key
        or proxy leaks in; credentials=False leaves the keys out too (a missing-keys test).
        """
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k.lower() not in _PROXY_VARS}
        env.update(AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
                   AWS_CONFIG_FILE="/nonexistent/aws-config",
                   AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials")
        if credentials:
            env.update(FAKE_KEYS)
        return env

    def instances(self, cluster: str, states: tuple[str, ...] | None = tuple(LIVE_STATES)) -> list[dict]:
        """Instances tagged with this cluster, in these states (None: any state)."""
        filters = [{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        pages = self.ec2.get_paginator("describe_instances").paginate(Filters=filters)
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]

    def user_data(self, instance_id: str) -> bytes | None:
        """The user-data this instance was launched with, as moto recorded it."""
        attr = self.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        raw = attr.get("UserData", {}).get("Value")
        return base64.b64decode(raw) if raw else None


@dataclass
class Boot:
    """One instance as the hypervisor saw it; times from time.monotonic()."""

    instance_id: str
    instance_type: str
    seen_s: float  #: first seen running
    started_s: float | None = None  #: its executor process started
    ended_s: float | None = None  #: its executor was powered off after the instance ended
    proc: subprocess.Popen | None = None
    imds: ImdsServer | None = None
    kill_at_s: float | None = None  #: SIGTERM sent; SIGKILL at this time if still alive


class Hypervisor:
    """Boots an executor for each running instance of one cluster; powers it off at the end.

    enabled=False runs the cloud without a hypervisor: instances never get an executor.
    Setting ``paused`` holds new boots (instances stay booting) while ended ones are still
    powered off.  ``boot_delay_s`` models boot time: an instance boots that long after it
    was first seen running.
    """

    def __init__(self, moto: MotoEc2, cluster: str, log_dir: Path | str | None = None, *,
                 boot_delay_s: float = 0.0, poll_s: float = 0.1, stop_grace_s: float = 2.0,
                 enabled: bool = True):
        self.moto, self.cluster = moto, cluster
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"ec2sim-{cluster}-"))
        self.boot_delay_s, self.poll_s, self.stop_grace_s = boot_delay_s, poll_s, stop_grace_s
        self.enabled = enabled
        self.paused = False
        self.boots: dict[str, Boot] = {}
        self._sizes: dict[str, list[str]] = {}  #: instance type -> the executor's --cpus/--memory
        self._env = {**moto.env(credentials=False), "PYTHONUNBUFFERED": "1"}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Hypervisor:
        """Start polling in a daemon thread (nothing when not enabled)."""
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name=f"hypervisor-{self.cluster}", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> Hypervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # the loop boundary: moto gone, an instance vanished mid-look
                log.exception("hypervisor of cluster %s: poll failed", self.cluster)

    def poll(self) -> None:
        """One look at the cloud: boot newly running instances, power off ended ones."""
        now = time.monotonic()
        running = {i["InstanceId"]: i for i in self.moto.instances(self.cluster, states=("running",))}
        for iid, inst in running.items():
            boot = self.boots.setdefault(iid, Boot(iid, inst["InstanceType"], now))
            if boot.proc is None and not self.paused and now - boot.seen_s >= self.boot_delay_s:
                self._boot(boot, inst["Placement"]["AvailabilityZone"])
        for boot in self.boots.values():
            if boot.proc is not None and boot.ended_s is None and boot.instance_id not in running:
                self._power_off(boot, now)

    def _boot(self, boot: Boot, zone: str) -> None:
        """Serve the instance its metadata and start its executor, as the image's boot unit does."""
        user_data = self.moto.user_data(boot.instance_id)
        boot.imds = ImdsServer(boot.instance_id, boot.instance_type, zone, user_data).start()
        with open(self.log_dir / f"{boot.instance_id}.log", "ab") as out:
            boot.proc = subprocess.Popen(
                spawn.falconet("executor", "--from-instance-metadata",
                 "--metadata-url", boot.imds.url, "--metadata-timeout", "10",
                 *self._size(boot.instance_type, user_data)),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=self._env)
        boot.started_s = time.monotonic()
        log.info("booted %s (%s): executor pid %d", boot.instance_id, boot.instance_type, boot.proc.pid)

    def _size(self, itype: str, user_data: bytes | None) -> list[str]:
        """--cpus and --memory of the instance type: the executor offers what a real one would
        (with slots in its user-data, it offers that many cpus, as a real one does)."""
        if user_data and b'"slots"' in user_data:
            return []
        if itype not in self._sizes:
            try:
                t = self.moto.ec2.describe_instance_types(InstanceTypes=[itype])["InstanceTypes"][0]
                self._sizes[itype] = ["--cpus", str(t["VCpuInfo"]["DefaultVCpus"]),
                                      "--memory", str(t["MemoryInfo"]["SizeInMiB"])]
            except Exception:  # an odd type: the executor offers this machine's own size
                log.exception("could not describe instance type %s", itype)
                self._sizes[itype] = []
        return self._sizes[itype]

    def _power_off(self, boot: Boot, now: float) -> None:
        """SIGTERM the executor's process group, SIGKILL it after the grace; then unplug IMDS."""
        proc = boot.proc
        if proc is None or boot.imds is None:
            return
        if proc.poll() is None:
            if boot.kill_at_s is None:
                boot.kill_at_s = now + self.stop_grace_s
                _signal_group(proc, signal.SIGTERM)
            elif now >= boot.kill_at_s:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            if proc.poll() is None:
                return  # still draining: look again next poll
        boot.imds.stop()
        boot.ended_s = now

    def stop(self) -> None:
        """Stop polling and kill every executor and IMDS server this hypervisor started."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for boot in self.boots.values():
            if boot.proc is not None:
                _signal_group(boot.proc, signal.SIGKILL)
                boot.proc.wait()
        # together: each stop() waits for its serving loop's next look at the flag (up to 0.5 s)
        stops = [threading.Thread(target=boot.imds.stop) for boot in self.boots.values()
                 if boot.imds is not None]
        for t in stops:
            t.start()
        for t in stops:
            t.join()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group led by proc, only while proc is unreaped (its id still ours)."""
    if proc.poll() is None:
        spawn.signal_group(proc.pid, sig)
