"""Build a running Provisioner from the command line's options."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from falconet import address, keys, needs
from falconet.client import Client
from falconet.errors import FalconetError
from falconet.provisioner import prices
from falconet.provisioner.backend import executor_tag_map
from falconet.provisioner.policy import Params, Strategy
from falconet.provisioner.service import Provisioner, Settings
from falconet.reports import Status

log = logging.getLogger("falconet.provisioner")


@dataclass(frozen=True)
class Options:
    """The provisioner's options, as `falconet provisioner` takes them (times in seconds).

    The command line fills every field; a misspelt or missing one fails at construction.
    """

    dispatcher: str  #: the dispatcher's client address
    backend: str = "local"  #: local, ec2 or slurm
    cluster: str = "falconet"
    min_executors: int = 0
    max_executors: int = 16
    policy: str = "additive"
    tasks_per_slot: float = 1.0
    idle_release: float = 60.0
    max_lifetime: float = 0.0
    budget: float = 0.0
    prices: str | None = None
    interval: float = 5.0
    boot_timeout: float | None = None  #: None: 300 on ec2, 600 slurm, 60 local
    release_grace: float = 600.0
    stop_grace: float = 30.0
    keep: bool = False
    slots: int | None = None
    executor_address: str | None = None
    executor_idle_timeout: float | None = None  #: None: 3600 on ec2, 600 slurm, 0 local
    region: str | None = None
    profile: str | None = None
    ec2_endpoint_url: str | None = None
    ami: str = "name:falconet-executor-*"
    ami_owner: str = "self"
    instance_types: str = "c5.large"
    subnet: str | None = None
    security_group: tuple[str, ...] = ()
    key_name: str | None = None
    iam_profile: str | None = None
    spot: bool = False
    tags: tuple[str, ...] = ()  #: KEY=VALUE instance tags
    executor_tag: tuple[str, ...] = ()  #: tags the launched executors report
    cloud_init: str | None = None
    shutdown_when_idle: bool = True
    clean_orphans: bool = False
    executor_key: str | None = None
    partition: str | None = None  #: slurm: the partition [default: the cluster's]
    account: str | None = None
    qos: str | None = None
    job_time: str = "1:00:00"  #: slurm: each pilot's walltime
    cpus_per_job: int | None = None  #: slurm: [default: a node's cpus]
    memory_per_job: int | None = None  #: slurm: MB [default: a node's memory]
    nodes_per_job: int = 1  #: slurm: nodes of each pilot, one executor on each
    sbatch_option: tuple[str, ...] = ()  #: slurm: more sbatch options
    sbatch_prologue: str | None = None  #: slurm: shell lines, or @FILE
    end_margin: float | None = None  #: slurm: seconds before the job's end its executor stops taking work
    job_log_dir: str | None = None  #: slurm: the pilots' scripts and output, on a shared filesystem


def build(o: Options) -> Provisioner:
    """Connect to the dispatcher, set up the backend, adopt what the cluster already runs."""
    client = Client(o.dispatcher, name=f"provisioner-{o.cluster}", connect_timeout_s=10)
    try:
        status = Status.from_map(client.status(timeout_s=10))
        executor_address = o.executor_address or status.endpoints.get("executor", "")
        if not executor_address:
            raise FalconetError("the dispatcher did not report its executor address; "
                                "pass --executor-address tcp://HOST:PORT")
        executor_address = address.parse(executor_address).url
        ec2, slurm = o.backend == "ec2", o.backend == "slurm"
        tag_map = executor_tag_map(o.executor_tag or ())
        executor_tags = tuple(needs.tags_from_map(tag_map))  # as the executors will report them
        idle_timeout = o.executor_idle_timeout
        if idle_timeout is None:
            idle_timeout = 3600.0 if ec2 else 600.0 if slurm else 0.0
        if ec2:
            backend = _ec2_backend(o, executor_address, idle_timeout, tag_map)
        elif slurm:
            backend = _slurm_backend(o, executor_address, idle_timeout, executor_tags)
        else:
            from falconet.provisioner.processes import LocalBackend

            extra = ("--idle-timeout", str(idle_timeout)) if idle_timeout else ()
            if o.executor_key:
                _executor_keys(o)  # fail now, not in every executor
                extra += ("--dispatcher-key", os.environ[keys.ENV_DISPATCHER_KEY], "--key", o.executor_key)
            backend = LocalBackend(executor_address, o.slots, executor_args=extra, tags=executor_tags)
        params = Params(
            types=backend.types(), strategy=Strategy(o.policy), min_executors=o.min_executors,
            max_executors=o.max_executors, tasks_per_slot=o.tasks_per_slot,
            idle_release_s=o.idle_release, max_lifetime_s=o.max_lifetime, budget_usd=o.budget)
        if params.min_executors > params.max_executors:
            raise FalconetError("--min-executors is larger than --max-executors")
        settings = Settings(
            params=params, cluster=o.cluster, interval_s=o.interval,
            boot_timeout_s=o.boot_timeout or (300.0 if ec2 else 600.0 if slurm else 60.0),
            release_grace_s=o.release_grace, keep=o.keep, stop_grace_s=o.stop_grace,
            # a pilot's replacement is queued one margin before its executor stops taking work
            renew_before_s=min(2 * backend.end_margin_s, backend.job_seconds / 2) if slurm else 0.0)
        prov = Provisioner(settings, backend, client)
        prov.adopt(clean_orphans=o.clean_orphans)
        return prov
    except BaseException:
        client.close()
        raise


def _ec2_backend(o: Options, executor_address: str, idle_timeout: float, tag_map: dict[str, str]) -> Any:
    from falconet.provisioner.ec2 import Ec2Backend, Ec2Settings
    from falconet.userdata import UserData

    host = address.parse(executor_address).host
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        log.warning("instances are told to reach the dispatcher at %s, which is only right when they "
                    "share this machine's network (tests); pass --executor-address with its private "
                    "address", executor_address)
    types = tuple(t.strip() for t in o.instance_types.split(",") if t.strip())
    if not types:
        raise FalconetError("--instance-types is empty; name at least one, e.g. c5.large")
    tags = {}
    for pair in o.tags:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise FalconetError(f"--tag takes KEY=VALUE, not {pair!r}")
        tags[key] = value
    settings = Ec2Settings(
        cluster=o.cluster, ami=o.ami, instance_types=types, ami_owner=o.ami_owner,
        region=o.region, profile=o.profile, endpoint_url=o.ec2_endpoint_url,
        subnet_id=o.subnet, security_group_ids=tuple(o.security_group), key_name=o.key_name,
        iam_profile=o.iam_profile, spot=o.spot, slots=o.slots or 0, tags=tags,
        prices=prices.load(o.prices), cloud_init=_cloud_init(o.cloud_init),
        executor_tags=tuple(needs.tags_from_map(tag_map)))
    dispatcher_key, secret = _executor_keys(o) if o.executor_key else ("", "")
    user_data = UserData(dispatcher=executor_address, cluster=o.cluster, slots=o.slots or 0,
                         idle_timeout_s=idle_timeout, shutdown_when_idle=o.shutdown_when_idle,
                         dispatcher_key=dispatcher_key, executor_secret_key=secret, tags=tag_map)
    backend = Ec2Backend(settings, user_data)
    backend.prepare()
    return backend


def _slurm_backend(o: Options, executor_address: str, idle_timeout: float, tags: tuple[str, ...]) -> Any:
    from falconet.provisioner.slurm import SlurmBackend, SlurmSettings

    args: tuple[str, ...] = ("--idle-timeout", f"{idle_timeout:g}") if idle_timeout else ()
    args += tuple(arg for t in tags for arg in ("--tag", t))
    if o.executor_key:  # the job reads the key file where it runs: a shared filesystem
        dispatcher_key, _ = _executor_keys(o)
        args += ("--dispatcher-key", dispatcher_key, "--key", os.path.abspath(o.executor_key))
    settings = SlurmSettings(
        cluster=o.cluster, executor_address=executor_address, job_time=o.job_time,
        partition=o.partition or "", account=o.account or "", qos=o.qos or "",
        cpus_per_job=o.cpus_per_job or 0, memory_per_job=o.memory_per_job or 0, nodes_per_job=o.nodes_per_job,
        sbatch_options=tuple(o.sbatch_option), prologue=_prologue(o.sbatch_prologue), slots=o.slots or 0,
        end_margin_s=o.end_margin or 0.0, executor_args=args, tags=frozenset(tags), log_dir=o.job_log_dir or "")
    backend = SlurmBackend(settings)
    backend.prepare()
    return backend


def _prologue(text: str | None) -> str:
    """--sbatch-prologue: shell lines, or @FILE to read them from."""
    if not text or not text.startswith("@"):
        return text or ""
    try:
        with open(text[1:]) as fh:
            return fh.read()
    except OSError as exc:
        raise FalconetError(f"cannot read --sbatch-prologue {text}: {exc.strerror}") from None


def _executor_keys(o: Options) -> tuple[str, str]:
    """(dispatcher public key, executor secret key) as z85 text, from --dispatcher-key and --executor-key."""
    if not os.environ.get(keys.ENV_DISPATCHER_KEY):
        raise FalconetError("--executor-key needs --dispatcher-key too: executors must know the dispatcher's key")
    public = keys.load_public(os.environ[keys.ENV_DISPATCHER_KEY])
    _, secret = keys.load_secret(o.executor_key)
    return public.decode(), secret.decode()


def _cloud_init(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as exc:
        raise FalconetError(f"cannot read --cloud-init {path}: {exc.strerror}") from None
    if not text.startswith("#cloud-config"):
        raise FalconetError(f"--cloud-init {path} must be a cloud-config file starting with '#cloud-config'")
    return text
