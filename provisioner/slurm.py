"""The Slurm backend: pilot jobs, each a batch job running one `falconet executor`.

A pilot is submitted with ``sbatch`` and found again with ``squeue``; every job of a fleet
is named ``falconet-<cluster>`` and carries the comment ``falconet:<cluster>:<token>:<i>``
(the launch that made it and its place in that launch).  Only jobs of this user with both
are ever listed, cancelled or counted: the provisioner never touches another job, and a
restarted one adopts its fleet by them.  A launch retried after an unclear failure first
looks for jobs with its token, so it never submits a pilot twice.

The executor's id is ``slurm-<job id>``, the machine's id for the provisioner.  A pilot of
several nodes (``nodes_per_job``) runs one executor per node through srun, ``slurm-<job
id>.<node index>``, and each node is a machine of its own: the policy counts nodes, as it
does instances.  Inside the job each executor asks squeue when the job ends and stops
taking work a margin before (see falconet.executor.boot.slurm_job_end), so the walltime
kills no task.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import pwd
import re
import shlex
import subprocess
import time
from dataclasses import dataclass

from falconet import spawn
from falconet.errors import FalconetError, LaunchError
from falconet.executor.boot import parse_slurm_time
from falconet.needs import machine_arch
from falconet.provisioner.backend import Machine
from falconet.provisioner.policy import InstanceType

log = logging.getLogger("falconet.provisioner.slurm")

COMMENT_PREFIX = "falconet"
PENDING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                  "SUSPENDED"}
#: squeue's states of a job that has ended (listed for a while after; MinJobAge)
ENDED_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT"}
_FIELDS = ("%i", "%T", "%k", "%V", "%e", "%N", "%r", "%L")  # id, state, comment, submitted, ends, nodes, reason, left
_SEP = "\x1f"
COMMAND_TIMEOUT_S = 60.0


def parse_job_time(text: str) -> int:
    """Slurm's --time formats as seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.

    Raises FalconetError naming the accepted forms (0 and UNLIMITED are refused: a pilot's
    end must be known for its executor to stop before it).
    """
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise FalconetError(f"--job-time {text!r}: use Slurm's forms MINUTES, MM:SS, HH:MM:SS, "
                            "D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = m.group(1), m.group(2), m.group(3), m.group(4)
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        seconds = int(a) * 60 + int(b)
    else:  # M
        seconds = int(a) * 60
    if seconds <= 0:
        raise FalconetError(f"--job-time {text!r}: a pilot needs a time limit above zero")
    return seconds


@dataclass(frozen=True)
class SlurmSettings:
    """What each pilot job asks Slurm for, and what its executor is told."""

    cluster: str
    executor_address: str
    job_time: str = "1:00:00"  #: each pilot's walltime (sbatch --time)
    partition: str = ""  #: "": the cluster's default
    account: str = ""
    qos: str = ""
    cpus_per_job: int = 0  #: 0: a whole node's cpus (sinfo)
    memory_per_job: int = 0  #: MB per node; 0: Slurm's default
    nodes_per_job: int = 1  #: nodes of each pilot, one executor on each
    sbatch_options: tuple[str, ...] = ()  #: more sbatch options, as given (--constraint=avx2)
    prologue: str = ""  #: shell lines run before the executor (module load, an environment)
    slots: int = 0  #: executor slots; 0: the job's cpus
    end_margin_s: float = 0.0  #: the executor stops taking work this long before the end; 0: auto
    executor_args: tuple[str, ...] = ()  #: idle timeout, keys, tags
    tags: frozenset[str] = frozenset()
    #: the pilots' scripts and output files; it must be on a filesystem the nodes share
    #: "": falconet-slurm-<cluster> in the current directory (Slurm's own default is there too)
    log_dir: str = ""
    env: dict | None = None  #: environment of the Slurm commands (SLURM_CONF in tests)


class SlurmBackend:
    """start/stop/list over sbatch, squeue and scancel; every command counted for status."""

    name = "slurm"

    def __init__(self, settings: SlurmSettings):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", settings.cluster):
            raise FalconetError(f"--cluster {settings.cluster!r}: with the slurm backend the name goes into "
                                "job names and comments, so use letters, digits, '.', '_' and '-' only")
        self.settings = settings
        self.job_seconds = parse_job_time(settings.job_time)
        self.end_margin_s = settings.end_margin_s or min(60.0, self.job_seconds / 4)
        self.log_dir = os.path.abspath(settings.log_dir or f"falconet-slurm-{settings.cluster}")
        self.calls: collections.Counter[str] = collections.Counter()
        self.user = _user()
        self._tried: set[str] = set()
        self._stopped: set[str] = set()  # nodes of a multi-node pilot stopped while the rest work on
        self._types: tuple[InstanceType, ...] = ()

    # ------------------------------------------------------------ commands

    def _run(self, what: str, argv: list[str], error: type[FalconetError] = LaunchError) -> str:
        """One Slurm command; its failure becomes one line with Slurm's own words."""
        self.calls[argv[0]] += 1
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                  env=self.settings.env, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise FalconetError(f"{argv[0]} not found: the slurm backend runs Slurm's commands, so run the "
                                "provisioner where they work (a login node; apt-get install slurm-client)") from None
        except subprocess.TimeoutExpired:
            raise error(f"{what}: {argv[0]} gave no answer within {COMMAND_TIMEOUT_S:g}s") from None
        if done.returncode != 0:
            words = " ".join((done.stderr or done.stdout).split()) or f"exit status {done.returncode}"
            raise error(f"{what}: {words}")
        return done.stdout

    # ------------------------------------------------------------ setup

    def prepare(self) -> None:
        """Check the partition and learn a pilot's size, once, before the first launch."""
        s = self.settings
        argv = ["sinfo", "-h", "-o", _SEP.join(("%P", "%c", "%m", "%a"))]
        if s.partition:
            argv += ["-p", s.partition]
        rows = [line.split(_SEP) for line in self._run("sinfo", argv, FalconetError).splitlines() if line]
        if not rows:
            known = sorted({r.split(_SEP)[0].rstrip("*") for r in
                            self._run("sinfo", ["sinfo", "-h", "-o", "%P"], FalconetError).split()})
            raise FalconetError(f"Slurm has no partition {s.partition!r}; it has: {', '.join(known) or 'none'} "
                                "(check --partition)")
        if not s.partition:  # the default partition is marked with a *
            rows = [r for r in rows if r[0].endswith("*")] or rows
        part, cpus, memory, avail = rows[0][0].rstrip("*"), _int(rows[0][1]), _int(rows[0][2]), rows[0][3]
        if avail != "up":
            log.warning("partition %s is %s: pilots will wait until it is up", part, avail)
        job_cpus = s.cpus_per_job or cpus or 1
        job_memory = s.memory_per_job or memory
        self._types = (InstanceType(f"slurm:{part}", job_cpus, job_memory, machine_arch(), 0.0, s.slots,
                                    s.tags, "local"),)
        log.info("Slurm cluster %s: pilots of %d cpus, %s MB, %s each in partition %s", s.cluster,
                 job_cpus, job_memory or "default", s.job_time, part)
        try:
            os.makedirs(self.log_dir, exist_ok=True)
        except OSError as exc:
            raise FalconetError(f"cannot make the pilots' log folder {self.log_dir}: {exc.strerror} "
                                "(set --job-log-dir)") from None

    def types(self) -> tuple[InstanceType, ...]:
        return self._types

    def api_calls(self) -> dict[str, int]:
        return dict(self.calls)

    # ------------------------------------------------------------ the three operations

    def list(self) -> list[Machine]:
        """This fleet's nodes: of jobs pending or running, and of those ended lately (state
        "ended"); a node stopped alone while its job works on is no longer listed."""
        jobs = self._jobs()
        self._stopped &= {f"{m.id}.{n}" for _, m in jobs for n in range(self.settings.nodes_per_job)}
        return [node for _, m in jobs for node in self._nodes(m) if node.id not in self._stopped]

    def _nodes(self, job: Machine) -> list[Machine]:
        """The machines of one pilot job: the job itself, or one per node of it."""
        k = self.settings.nodes_per_job
        return [job] if k == 1 else [dataclasses.replace(job, id=f"{job.id}.{n}") for n in range(k)]

    def _jobs(self) -> list[tuple[int, Machine]]:
        """(index in its launch, machine) of every job of this fleet squeue lists."""
        out = self._run("squeue", ["squeue", "-h", "-t", "all", "-u", self.user, "-n", self.job_name,
                                   "-o", _SEP.join(_FIELDS)])
        return [job for line in out.splitlines() if (job := self._machine(line.split(_SEP))) is not None]

    def start(self, itype: InstanceType, count: int, token: str) -> list[Machine]:
        """Pilots for `count` nodes: ceil(count / nodes_per_job) jobs."""
        done: dict[int, Machine] = {}
        if token in self._tried:  # a retry: the first try may have submitted some after all
            done = {i: m for i, m in self._jobs() if m.launch_token == token and m.state != "ended"}
            if done:
                log.info("launch %s had submitted %d pilot jobs already; not submitting them again",
                         token, len(done))
        self._tried.add(token)
        started = list(done.values())
        for i in range(math.ceil(count / self.settings.nodes_per_job)):
            if i in done:
                continue
            job = self._run(f"sbatch ({itype.name})", ["sbatch", "--parsable", *self._sbatch_args(token, i),
                                                       self._script(token, i)]).strip().split(";")[0]
            started.append(Machine(f"slurm-{job}", itype.name, "pending", time.time(), token, "", "submitted"))
        self._tried.discard(token)  # known outcome: no retry will reuse this token
        return [node for job in started for node in self._nodes(job)]

    def stop(self, ids: list[str]) -> None:
        """Cancel the jobs of these machines.  A node of a multi-node pilot is cancelled with
        its job once every node of it is stopped; until then it is only no longer listed
        (its executor has left, or never came), and the job ends when its last executor does."""
        k = self.settings.nodes_per_job
        jobs = []
        for mid in ids:
            if not mid.startswith("slurm-"):
                continue
            job, _, node = mid.removeprefix("slurm-").partition(".")
            if k == 1 or not node:
                jobs.append(job)
                continue
            self._stopped.add(mid)
            if all(f"slurm-{job}.{n}" in self._stopped for n in range(k)):
                jobs.append(job)
        for i in range(0, len(jobs), 200):
            self._run("scancel", ["scancel", *jobs[i:i + 200]])

    # ------------------------------------------------------------ jobs

    @property
    def job_name(self) -> str:
        return f"falconet-{self.settings.cluster}"

    def _sbatch_args(self, token: str, index: int) -> list[str]:
        s = self.settings
        args = [f"--job-name={self.job_name}", f"--comment={COMMENT_PREFIX}:{s.cluster}:{token}:{index}",
                f"--time={s.job_time}", f"--nodes={s.nodes_per_job}", "--ntasks-per-node=1",
                f"--cpus-per-task={self._types[0].vcpus}" if self._types else "--exclusive",
                f"--output={os.path.join(self.log_dir, 'slurm-%j.out')}"]
        if s.memory_per_job:
            args.append(f"--mem={s.memory_per_job}")
        for flag, value in (("--partition", s.partition), ("--account", s.account), ("--qos", s.qos)):
            if value:
                args.append(f"{flag}={value}")
        return [*args, *s.sbatch_options]

    def _script(self, token: str, index: int) -> str:
        """The batch script's path: the prologue, then the executor in the job's place."""
        s = self.settings
        itype = self._types[0]
        executor = spawn.falconet(
            "executor", "--dispatcher", s.executor_address, "--slots", str(itype.capacity),
            "--cpus", str(itype.capacity), *(("--memory", str(s.memory_per_job)) if s.memory_per_job else ()),
            "--end-margin", f"{self.end_margin_s:g}", *s.executor_args)
        if s.nodes_per_job == 1:  # the id names the job: the provisioner matches executors to jobs by it
            run = f"exec {shlex.join(executor)} --id slurm-$SLURM_JOB_ID"
        else:  # one executor per node, named by the job and the node's index in it
            each = shlex.quote(f'exec {shlex.join(executor)} --id "slurm-$SLURM_JOB_ID.$SLURM_NODEID"')
            run = (f"exec srun --nodes={s.nodes_per_job} --ntasks-per-node=1 --cpus-per-task={itype.vcpus} "
                   f"--kill-on-bad-exit=0 sh -c {each}")
        lines = ["#!/bin/sh", f"# falconet pilot: cluster {s.cluster}, launch {token} #{index}", s.prologue, run]
        path = os.path.join(self.log_dir, f"pilot-{token}-{index}.sh")
        with open(path, "w") as fh:
            fh.write("\n".join(line for line in lines if line) + "\n")
        os.chmod(path, 0o700)  # it may hold the executor's key path
        return path

    def _machine(self, row: list[str]) -> tuple[int, Machine] | None:
        """(index in its launch, Machine) from one squeue row; None for a job not of this fleet."""
        if len(row) != len(_FIELDS):
            return None
        job, state, comment, submitted, ends, nodes, reason, left = row
        ours = f"{COMMENT_PREFIX}:{self.settings.cluster}:"
        token, _, index = comment.removeprefix(ours).rpartition(":")
        if not comment.startswith(ours) or not token or not index.isdigit():
            return None
        state = state.split()[0] if state else ""
        if state in ENDED_STATES:
            kind, detail = "ended", f"{state}" + (f" ({reason})" if reason and reason != "None" else "")
        elif state in PENDING_STATES:
            kind, detail = "pending", f"{state} ({reason})" if reason and reason != "None" else state
        else:
            kind, detail = "running", f"{state} on {nodes}, {left} left"
        itype = self._types[0].name if self._types else "slurm"
        return int(index), Machine(f"slurm-{job}", itype, kind, parse_slurm_time(submitted) or time.time(),
                                   token, nodes if nodes and nodes != "(null)" else "", detail,
                                   parse_slurm_time(ends) if kind == "running" else 0.0)


def _int(text: str) -> int:
    """sinfo's numbers (2, 7900, 7900+) as int; 0 when unknown."""
    m = re.match(r"\d+", text.strip())
    return int(m.group()) if m else 0


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name
