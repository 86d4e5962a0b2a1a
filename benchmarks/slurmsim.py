"""A real single-node Slurm for tests and benchmarks: munged, slurmctld and slurmd as child
processes (the slurm backend's tests, and `falconet bench --only provisioning`).

Everything lives in one temporary directory: the munge key, socket and logs, slurm.conf,
Slurm's state, spool, logs and pid files. Every Slurm command must run with `cluster.env`
(SLURM_CONF points at the temporary slurm.conf, whose AuthInfo names our munge socket), so
nothing touches the machine's own /etc/slurm or /run/munge.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
INSTALL_HINT = "as root: apt-get install -y slurm-wlm munge"
PARTITIONS = ("debug", "short")  # the first is the default
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


def unavailable() -> str | None:
    """Why a SlurmCluster cannot run here (binaries missing, not root), or None if it can."""
    missing = [name for name in BINARIES if _which(name) is None]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}); {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the test Slurm's slurmd must run as root to start jobs as their users; run the tests as root"
    return None


def _which(name: str) -> str | None:
    # slurmctld, slurmd and munged live in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def free_ports(count: int) -> list[int]:
    """count distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    """Poll predicate until it is true; raise TimeoutError naming `what` if it never is."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def half_memory_mb() -> int:
    """About half of this machine's RAM, in MB (the node's RealMemory)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(total // 2 // 2**20, 100)


def slurm_conf(root: Path, node: str, cpus: int, memory_mb: int, ctld_port: int, slurmd_ports: list[int],
               names: list[str] | None = None) -> str:
    """slurm.conf text for nodes on 127.0.0.1, all paths under root, short intervals.  node is
    this host's name; with names, each is a node of its own slurmd (-N) on its own port.  A
    node of more cpus than the machine has is declared as such (config_overrides)."""
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
    names = names or [node]
    if len(names) == 1:
        node_lines = [f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN"]
    else:  # several slurmd on one host: each its own name, port, spool and pid file (%n)
        node_lines = [f"NodeName={name} NodeHostname={node} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                      f"RealMemory={memory_mb // len(names)} State=UNKNOWN" for name, port in zip(names, slurmd_ports)]
    partitions = [f"PartitionName={name} Nodes={','.join(names)} MaxTime=INFINITE State=UP"
                  + (" Default=YES" if i == 0 else "") for i, name in enumerate(PARTITIONS)]
    return "\n".join([
        "ClusterName=falconet-test",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_ports[0]}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}" + ("-%n" if len(names) > 1 else ""),
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd'}" + ("-%n.pid" if len(names) > 1 else ".pid"),
        # No SlurmctldLogFile or SlurmdLogFile: run with -D, the daemons log to stderr, which
        # _spawn sends to log/<name>.log.
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups: this runs in containers and VMs without systemd or cgroup delegation.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        # Without a default, a job asking no memory is given the whole node's and runs alone.
        "DefMemPerCPU=100",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        *(["SlurmdParameters=config_overrides"] if cpus > (os.cpu_count() or 1) else []),
        "SchedulerType=sched/backfill",
        # A job that the submit-time attempt cannot place (the node still busy cleaning up a
        # cancelled job, say) waits for the main scheduler's next pass, about 3 s here, or the
        # backfill's: a 1 s backfill starts it within about a second.
        "SchedulerParameters=bf_interval=1",
        "MinJobAge=2",
        "KillWait=1",
        "InactiveLimit=0",
        "SlurmdTimeout=30",
        "SlurmctldTimeout=30",
        "MessageTimeout=10",
        *node_lines,
        *partitions,
        "",
    ])


class SlurmCluster:
    """munged, slurmctld and slurmd in a temporary directory; a context manager.

    `env` is the environment for sbatch, squeue, scancel, sinfo and scontrol; `node` is the
    one node's name; `partitions` are the partitions, the default first.
    """

    def __init__(self, root: Path | None = None, cpus: int = 0, nodes: int = 1):
        """cpus: each node's (0: this machine's); more lets many one-cpu pilots run at once.
        nodes: more than one runs a slurmd per node on this host, for jobs of several nodes."""
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="falconet-test-slurm-")) if root is None else root
        self.root.chmod(0o755)  # munged wants its socket reachable by all, jobs their spool
        self.conf_path = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        #: the nodes' names: this host's, or <host>-n1... for several
        self.nodes = [self.node] if nodes == 1 else [f"{self.node}-n{i + 1}" for i in range(nodes)]
        self.partitions = PARTITIONS
        self.cpus = cpus or os.cpu_count() or 1
        self.env = {**os.environ, "SLURM_CONF": str(self.conf_path)}
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf_path)])
            for name in self.nodes:
                self._spawn(f"slurmd-{name}" if len(self.nodes) > 1 else "slurmd",
                            [_which("slurmd"), "-D", "-f", str(self.conf_path), "-N", name])
            wait_for(self._node_idle, START_TIMEOUT_S, f"nodes {','.join(self.nodes)} idle in sinfo")
        except Exception as e:
            logs = self.logs()
            self.stop()
            raise RuntimeError(f"the test Slurm did not start: {e}\n{logs}") from e
        except BaseException:  # KeyboardInterrupt: leave nothing running
            self.stop()
            raise

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o755)
        key = munge / "munge.key"
        subprocess.run([_which("mungekey"), "--create", "--keyfile", str(key)], check=True,
                       capture_output=True)
        key.chmod(0o400)
        socket_path = munge / "munge.socket"
        # --force: munged refuses to start when a directory above its socket is unreachable
        # by others or writable by them (an odd TMPDIR); it only warns with it.
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--socket={socket_path}",
            f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}",
        ])
        wait_for(socket_path.exists, 10.0, "munged's socket")

    def _write_conf(self) -> None:
        (self.root / "state").mkdir(mode=0o755)
        for name in ["spool"] if len(self.nodes) == 1 else [f"spool-{n}" for n in self.nodes]:
            (self.root / name).mkdir(mode=0o755)
        ctld_port, *slurmd_ports = free_ports(1 + len(self.nodes))
        self.conf_path.write_text(slurm_conf(self.root, self.node, self.cpus, half_memory_mb(),
                                             ctld_port, slurmd_ports, self.nodes))

    def _spawn(self, name: str, args: list[str]) -> None:
        log_dir = self.root / "log"
        log_dir.mkdir(exist_ok=True)
        with open(log_dir / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(args, env=self.env, stdin=subprocess.DEVNULL,
                                                stdout=out, stderr=out, start_new_session=True)

    def _node_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}")
        result = self.run("sinfo", "--noheader", "--Node", "--partition", PARTITIONS[0], "--format", "%N %t",
                          check=False)
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return result.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def run(self, *args: str, check: bool = True, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
        """Run a Slurm command (`run("squeue", "-h")`) against this cluster, capturing text."""
        return subprocess.run([_which(args[0]) or args[0], *args[1:]], env=self.env, check=check,
                              capture_output=True, text=True, timeout=timeout_s)

    def sbatch(self, *args: str) -> str:
        """Submit a batch job (`sbatch --parsable *args`) and return its id."""
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        """The job's state in squeue (PENDING, RUNNING, COMPLETING...), "" once it has left."""
        result = self.run("squeue", "--noheader", "--jobs", job_id, "--format", "%T", check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def stop(self) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged, and remove the directory."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self._cancel_all()
        slurmds = [name for name in self.procs if name.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
            if name in self.procs:
                _terminate(self.procs.pop(name))
        # slurmstepd and the jobs leave slurmd's session; whatever scancel missed still
        # carries our SLURM_CONF in its environment.
        _kill_by_environ(f"SLURM_CONF={self.conf_path}")
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def cancel_all(self) -> None:
        """Cancel every job and wait (a few seconds at most) for the queue to empty."""
        self._cancel_all()

    def _cancel_all(self) -> None:
        try:
            self.run("scancel", "--user", str(os.geteuid()), check=False, timeout_s=10.0)
            wait_for(lambda: not self.run("squeue", "--noheader", check=False).stdout.strip(),
                     STOP_GRACE_S * 2, "the queue to empty after scancel")
        except (subprocess.TimeoutExpired, TimeoutError):
            pass  # _kill_by_environ ends what is left

    def logs(self) -> str:
        """The tail of every log in the cluster's directory, each under its name."""
        log_dir = self.root / "log"
        if not log_dir.is_dir():
            return ""
        return "\n".join(f"----- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(log_dir.iterdir()))


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM a daemon's process group, SIGKILL it if it lingers, and reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _kill_by_environ(marker: str) -> None:
    """SIGKILL every process whose environment holds marker (a line such as SLURM_CONF=...)."""
    needle = marker.encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or a kernel thread
        if needle in environ:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
