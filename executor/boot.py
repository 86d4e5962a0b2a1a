"""How an executor comes up: its options, merged with the instance's user-data on a cloud
instance, become an ExecutorConfig; after it leaves for idleness, the machine may power off.

The command line only parses and calls these: options given there win over the
user-data's, and the user-data fills in the rest (the provisioner writes it).
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass, field, replace

from falconet import keys, needs
from falconet.executor import agent, host

log = logging.getLogger("falconet.executor")


@dataclass(frozen=True)
class Options:
    """What the person or the boot unit asked for; None or empty: not given."""

    dispatcher: str | None = None
    slots: int | None = None
    idle_timeout_s: float | None = None
    prefetch: int | None = None
    executor_id: str = ""
    dispatcher_key: str | None = None
    key: str | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    tags: tuple[str, ...] = ()
    work_dir: str = ""
    cache_mb: int = 10_240
    facts: dict = field(default_factory=dict)  #: extra registration facts (the instance's)
    secret_text: str = ""  #: the executor's secret key as text (from user-data)
    shutdown_when_idle: bool = False  #: power off after leaving for idleness
    ends_at: float = 0.0  #: epoch time the allocation ends (0: never, or ask Slurm inside a job)
    end_margin_s: float = 60.0


def with_user_data(given: Options, metadata_url: str, timeout_s: float) -> Options:
    """given, completed from the instance metadata and user-data (given wins).

    Raises MetadataError or UserDataError, each a FalconetError with the reason.
    """
    from falconet.executor import metadata
    from falconet.userdata import parse

    inst = metadata.read_instance(metadata_url, timeout_s=timeout_s)
    ud = parse(inst.user_data, f"user-data of instance {inst.instance_id}")
    return replace(
        given,
        dispatcher=given.dispatcher or ud.dispatcher,
        slots=given.slots or ud.slots or None,
        cpus=given.cpus or ud.slots or None,  # the provisioner counts an instance's room in its slots
        idle_timeout_s=ud.idle_timeout_s if given.idle_timeout_s is None else given.idle_timeout_s,
        prefetch=given.prefetch if given.prefetch is not None else (ud.prefetch if ud.prefetch >= 0 else None),
        executor_id=given.executor_id or inst.instance_id,
        dispatcher_key=given.dispatcher_key or ud.dispatcher_key or None,
        secret_text="" if given.key else ud.executor_secret_key,
        tags=given.tags + tuple(needs.tags_from_map(ud.tags)),
        shutdown_when_idle=ud.shutdown_when_idle,
        facts={"instance_id": inst.instance_id, "instance_type": inst.instance_type,
               "availability_zone": inst.availability_zone, "cluster": ud.cluster,
               "launch_token": ud.launch_token},
    )


def config(o: Options) -> agent.ExecutorConfig:
    """The executor's configuration; raises KeyFileError for keys it cannot use."""
    if not o.dispatcher:
        raise ValueError("no dispatcher address")
    creds = keys.credentials(o.dispatcher_key, o.key, secret_text=o.secret_text)
    return agent.ExecutorConfig(dispatcher=o.dispatcher, slots=o.slots or o.cpus or host.cpus(),
                                idle_timeout_s=o.idle_timeout_s or 0.0, prefetch=o.prefetch,
                                executor_id=o.executor_id, facts=o.facts, credentials=creds,
                                cpus=o.cpus or 0, memory_mb=o.memory_mb or 0, tags=o.tags,
                                work_dir=o.work_dir, cache_mb=o.cache_mb,
                                ends_at=o.ends_at or slurm_job_end(), end_margin_s=o.end_margin_s)


def slurm_job_end(env: dict | None = None) -> float:
    """Inside a Slurm job (SLURM_JOB_ID set): the epoch time its time limit ends, from
    squeue; 0.0 outside one, for a job with no limit, or when squeue cannot tell."""
    job = (env if env is not None else os.environ).get("SLURM_JOB_ID")
    if not job:
        return 0.0
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("inside Slurm job %s, but squeue could not tell when it ends (%s); pass --ends-at "
                    "so that no task is cut off by its time limit", job, exc)
        return 0.0
    return parse_slurm_time(out)


def parse_slurm_time(text: str) -> float:
    """squeue's local time (2026-12-03T22:00:00) as epoch seconds; 0.0 for none (Unknown,
    N/A, NONE: a job with no time limit)."""
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return 0.0


def shut_down_if_asked(o: Options, ex: agent.Executor, code: int, command: str) -> None:
    """After leaving for idleness, run the shutdown command if the user-data asks for it,
    so a forgotten fleet stops costing money."""
    if code != 0 or not ex.left_idle or not o.shutdown_when_idle:
        return
    if command:
        log.info("left for idleness; shutting down: %s", command)
        subprocess.run(command, shell=True, check=False)
    else:
        log.warning("user-data asks to shut down when idle, but no --shutdown-command is set")
