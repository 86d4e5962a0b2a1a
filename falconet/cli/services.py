"""The long-running services: dispatcher, executor and provisioner.

Each logs on stderr, prints where it can be reached, stops cleanly on SIGTERM or Ctrl-C,
and with --parent-pid leaves when the process that started it is gone.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import click

from falconet.cli.options import NameWeight, check_address, client_keys, log_level, parent_pid
from falconet.cli.signals import watch_parent
from falconet.errors import FalconetError


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _strategies() -> list:
    from falconet.provisioner.policy import Strategy

    return list(Strategy)


@click.command()
@click.option("--host", default="127.0.0.1", show_envvar=True,
              help="Address to listen on; anything but loopback needs --insecure until keys exist.")
@click.option("--client-port", type=click.IntRange(0, 65535), default=0, show_envvar=True,
              help="Port for clients (0: any free port).")
@click.option("--executor-port", type=click.IntRange(0, 65535), default=0, show_envvar=True,
              help="Port for executors (0: any free port).")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.01), default=1.0, show_envvar=True,
              help="Seconds between heartbeats to quiet executors.")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0.05), default=10.0, show_envvar=True,
              help="Seconds of silence after which an executor is declared lost.")
@click.option("--max-message-bytes", type=click.IntRange(min=65536), default=256 << 20, show_envvar=True,
              help="Largest message taken from a peer; a peer that sends more is disconnected.")
@click.option("--max-task-bytes", type=click.IntRange(min=1), default=64 << 20, show_envvar=True,
              help="Largest task body accepted; a larger task fails with the reason.")
@click.option("--max-output-bytes", type=click.IntRange(min=0), default=64 << 20, show_envvar=True,
              help="Hard limit on one task's result: a command's stdout and stderr together, or a "
                   "Python task's return value; a larger one fails its task with the reason. Not the "
                   "capture cap: a command keeps 1 MiB of stdout and of stderr by default, set per "
                   "task by the client (falconet run/submit --output-cap, output_cap=); a cap above "
                   "this limit is refused at submit.")
@click.option("--max-submit-batch", type=click.IntRange(min=1), default=100_000, show_envvar=True,
              help="Most tasks in one submission; clients split their batches to fit.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None, show_envvar=True,
              help="Keep a journal here: accepted tasks and results survive a crash or restart "
                   "[default: in memory only].")
@click.option("--compact-mb", type=click.IntRange(min=1), default=64, show_envvar=True,
              help="Compact the journal once it reaches this size (and doubles since the last time).")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, exists=True), default=None,
              show_envvar=True, metavar="DIR",
              help="CURVE on both ports: DIR from 'falconet keys init' (dispatcher.key_secret, authorized/).")
@click.option("--insecure", is_flag=True, show_envvar=True,
              help="Allow listening beyond loopback without authentication (loudly logged).")
@click.option("--fail-unschedulable", type=click.FloatRange(min=0), default=0.0, show_envvar=True, metavar="S",
              help="Fail tasks that no connected or launchable executor can run after S seconds "
                   "(0: keep them queued, shown as unschedulable in status).")
@click.option("--reserve-after", type=click.FloatRange(min=0), default=1.0, show_envvar=True, metavar="S",
              help="A task with requirements that found no free cpus for S seconds reserves an "
                   "executor: it gets no other work until the task fits (no starvation).")
@click.option("--max-blob-store-mb", type=click.IntRange(min=1), default=4096, show_envvar=True,
              help="Room for staged files routed through the dispatcher (inputs and outputs).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None, show_envvar=True,
              help="Serve /metrics (Prometheus), the live dashboard at / and /api/status on this "
                   "port (0: any free port; printed as 'http: URL') [default: no HTTP].")
@click.option("--http-host", default="127.0.0.1", show_envvar=True,
              help="Address of the HTTP side; anything but loopback needs --http-token or --insecure.")
@click.option("--http-token", default="", show_envvar=True, metavar="TOKEN",
              help="Every HTTP request must carry it ('Authorization: Bearer TOKEN', or ?token=TOKEN "
                   "once in the dashboard's address); prefer the environment variable to the command line.")
@click.option("--event-history", type=click.IntRange(min=0), default=100_000, show_envvar=True,
              metavar="N", help="Task, executor and fleet events kept for 'falconet events' (about 120 "
                                "bytes each in memory; with --state-dir also on disk, at most 1.5 N); 0: none.")
@click.option("--client-timeout", type=click.FloatRange(min=0), default=300.0, show_envvar=True, metavar="S",
              help="Cancel the queued tasks of a client silent this long (a live client with tasks out "
                   "speaks every few seconds; one that comes back sooner keeps its work); 0: never.")
@click.option("--result-expiry", type=click.FloatRange(min=0), default=3600.0, show_envvar=True, metavar="S",
              help="Drop the results a client never acknowledged once it has been silent this long "
                   "(from the journal too); 0: never.")
@click.option("--max-unacked-mb", type=click.IntRange(min=1), default=256, show_envvar=True,
              help="A client's unacknowledged results above this many MB hold its queued tasks back "
                   "until it reads them (a client that stops reading cannot pin the dispatcher's memory).")
@click.option("--client-weight", "client_weights", type=NameWeight(), multiple=True, show_envvar=True,
              help="Share of free slots of the clients named NAME (Client(name=...)) against the other "
                   "clients with queued work [default: 1 each] (repeatable).")
@log_level
@parent_pid
def dispatcher(host: str, client_port: int, executor_port: int, heartbeat_interval: float,
               heartbeat_timeout: float, max_message_bytes: int, max_task_bytes: int,
               max_output_bytes: int, max_submit_batch: int, state_dir: str | None, compact_mb: int,
               keys_dir: str | None, insecure: bool, fail_unschedulable: float, reserve_after: float,
               max_blob_store_mb: int, http_port: int | None, http_host: str, http_token: str,
               event_history: int, client_timeout: float, result_expiry: float, max_unacked_mb: int,
               client_weights: tuple, log_level: str, parent_pid: int | None) -> None:
    """Run a dispatcher; prints 'client: ADDR' and 'executor: ADDR' (and 'http: URL' with
    --http-port), then serves."""
    from falconet.dispatcher import server
    from falconet.dispatcher.core import Config
    from falconet.dispatcher.web import WebOptions

    _logging(log_level)
    if heartbeat_timeout <= heartbeat_interval:
        raise click.UsageError("--heartbeat-timeout must be longer than --heartbeat-interval")
    config = Config(heartbeat_interval_s=heartbeat_interval, heartbeat_timeout_s=heartbeat_timeout,
                    max_message_bytes=max_message_bytes, max_task_bytes=max_task_bytes,
                    max_output_bytes=max_output_bytes, max_submit_batch=max_submit_batch,
                    fail_unschedulable_s=fail_unschedulable, reserve_after_s=reserve_after,
                    client_timeout_s=client_timeout, result_expiry_s=result_expiry,
                    max_unacked_bytes=max_unacked_mb << 20, client_weights=client_weights)
    try:
        srv = server.Server(host, client_port, executor_port, config, insecure=insecure,
                            state_dir=state_dir, compact_bytes=compact_mb << 20, keys_dir=keys_dir,
                            blob_store_bytes=max_blob_store_mb << 20, event_history=event_history,
                            http=None if http_port is None else WebOptions(http_host, http_port, http_token, insecure))
    except (FalconetError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    signal.signal(signal.SIGTERM, srv.stop)
    signal.signal(signal.SIGINT, srv.stop)
    watch_parent(parent_pid, srv.stop)
    click.echo(f"client: {srv.client_address}")
    click.echo(f"executor: {srv.executor_address}")
    if srv.http_address:
        click.echo(f"http: {srv.http_address}")
    sys.stdout.flush()
    srv.serve()


@click.command()
@click.option("--dispatcher", default=None, show_envvar=True, metavar="tcp://HOST:PORT", callback=check_address,
              help="The dispatcher's executor address (the 'executor:' line it printed); "
                   "required unless --from-instance-metadata.")
@click.option("--slots", type=click.IntRange(min=1), default=None, show_envvar=True,
              help="Tasks run at once [default: the CPUs this process may use].")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=None, show_envvar=True,
              help="Leave after this many seconds without work (0: never) [default: 0].")
@click.option("--prefetch", type=click.IntRange(min=0), default=None, show_envvar=True,
              help="Tasks to hold beyond the free slots [default: sized to ~10 ms of work].")
@click.option("--id", "executor_id", default="", show_envvar=True,
              help="Executor id [default: the instance id on a cloud instance, else hostname "
                   "and a random suffix].")
@click.option("--from-instance-metadata", "from_metadata", is_flag=True, show_envvar=True,
              help="Read the dispatcher address and settings from the instance's user-data "
                   "(IMDSv2), as the executor baked into an image does at boot.")
@click.option("--metadata-url", default="http://169.254.169.254", show_envvar=True,
              help="Instance metadata service to read with --from-instance-metadata.")
@click.option("--metadata-timeout", type=click.FloatRange(min=0.1), default=60.0, show_envvar=True,
              help="Seconds to keep trying the metadata service before giving up.")
@click.option("--dispatcher-key", default=None, show_envvar=True, metavar="FILE|KEY",
              help="The dispatcher's public key, for a dispatcher started with --keys "
                   "[default: $FALCONET_DISPATCHER_KEY, or the user-data's].")
@click.option("--key", default=None, show_envvar=True, metavar="FILE",
              help="This executor's secret key file (executor.key_secret) [default: $FALCONET_KEY, "
                   "or the user-data's].")
@click.option("--shutdown-command", default="", show_envvar=True,
              help="Run after leaving for idleness when the user-data sets shutdown_when_idle, "
                   "e.g. 'systemctl poweroff' (the image's boot unit sets it; empty: do nothing).")
@click.option("--cpus", type=click.IntRange(min=1), default=None, show_envvar=True,
              help="CPUs offered to tasks; tasks asking for more never come here "
                   "[default: the CPUs this process may use].")
@click.option("--memory", type=click.IntRange(min=1), default=None, show_envvar=True, metavar="MB",
              help="Memory offered to tasks, in MB [default: the machine's].")
@click.option("--tag", "tags", multiple=True, show_envvar=True, metavar="TAG",
              help="A tag tasks may ask for, e.g. gpu or site=cloud (repeatable; added to the user-data's). "
                   "site=local or site=cloud is added when not given (cloud on an EC2 instance).")
@click.option("--work-dir", default="", show_envvar=True, metavar="DIR",
              help="Where tasks with files get private work dirs, and where the input cache lives "
                   "[default: a new temp dir].")
@click.option("--cache-mb", type=click.IntRange(min=1), default=10_240, show_envvar=True,
              help="Size bound of the input-file cache.")
@click.option("--ends-at", type=click.FloatRange(min=0), default=0.0, show_envvar=True, metavar="EPOCH",
              help="When this executor's allocation ends (Unix time): it stops taking work --end-margin "
                   "before, finishing what runs, and takes no task whose walltime would outlast it "
                   "[default: inside a Slurm job, the job's end from squeue; else never].")
@click.option("--end-margin", type=click.FloatRange(min=0), default=60.0, show_envvar=True, metavar="SECONDS",
              help="How long before --ends-at it stops taking work.")
@log_level
@parent_pid
def executor(dispatcher: str | None, slots: int | None, idle_timeout: float | None,
             prefetch: int | None, executor_id: str, from_metadata: bool, metadata_url: str,
             metadata_timeout: float, dispatcher_key: str | None, key: str | None, shutdown_command: str,
             cpus: int | None, memory: int | None, tags: tuple[str, ...], work_dir: str, cache_mb: int,
             ends_at: float, end_margin: float, log_level: str, parent_pid: int | None) -> None:
    """Run an executor: connect out to a dispatcher and run the tasks it hands over.

    SIGTERM drains it: running tasks finish, queued ones go back, then it leaves.
    Options given on the command line win over the user-data's.
    """
    from falconet.executor import agent, boot

    _logging(log_level)
    bad = [t for t in tags if not t or any(c.isspace() for c in t)]
    if bad:
        raise click.BadParameter(f"a tag is a word without spaces, such as gpu or site=cloud, not {bad[0]!r}",
                                 param_hint="--tag")
    options = boot.Options(dispatcher=dispatcher, slots=slots, idle_timeout_s=idle_timeout, prefetch=prefetch,
                           executor_id=executor_id, dispatcher_key=dispatcher_key, key=key, cpus=cpus,
                           memory_mb=memory, tags=tuple(tags), work_dir=work_dir, cache_mb=cache_mb,
                           ends_at=ends_at, end_margin_s=end_margin)
    try:
        if from_metadata:
            options = boot.with_user_data(options, metadata_url, metadata_timeout)
        if not options.dispatcher:
            raise click.UsageError("give --dispatcher tcp://HOST:PORT, or --from-instance-metadata")
        ex = agent.Executor(boot.config(options))
    except FalconetError as exc:  # metadata, user-data, keys, address: restarting cannot fix it
        click.echo(f"error: {exc}", err=True)
        sys.exit(78)  # EX_CONFIG: systemd's RestartPreventExitStatus stops a crash loop
    signal.signal(signal.SIGTERM, ex.request_drain)
    signal.signal(signal.SIGINT, ex.request_drain)
    watch_parent(parent_pid, ex.request_stop)  # the embedded run that wanted the results is gone
    code = ex.run()
    boot.shut_down_if_asked(options, ex, code, shutdown_command)
    sys.exit(code)


def _config_file(ctx: click.Context, _param: click.Parameter, path: str | None) -> str | None:
    """--config FILE: the [provisioner] table of a TOML file becomes the options' defaults."""
    if path:
        from falconet.config import command_defaults

        try:
            ctx.default_map = {**(ctx.default_map or {}), **command_defaults(path, ctx.info_name or "")}
        except FalconetError as exc:
            raise click.BadParameter(str(exc)) from None
    return path


@click.command()
@click.option("--config", type=click.Path(dir_okay=False, exists=True), callback=_config_file,
              is_eager=True, expose_value=False, show_envvar=True,
              help="TOML file whose [provisioner] table gives defaults for these options.")
@click.option("--dispatcher", required=True, show_envvar=True, metavar="tcp://HOST:PORT", callback=check_address,
              help="The dispatcher's client address.")
@click.option("--backend", type=click.Choice(["local", "ec2", "slurm"]), default="local", show_envvar=True,
              help="Where executors run: processes on this machine, EC2 instances, or Slurm batch "
                   "jobs (pilots).")
@click.option("--min-executors", type=click.IntRange(min=0), default=0, show_envvar=True,
              help="Executors kept even with no work.")
@click.option("--max-executors", type=click.IntRange(min=1), default=16, show_envvar=True,
              help="Executors never exceeded.")
@click.option("--policy", type=click.Choice([s.value for s in _strategies()]), default="additive",
              show_envvar=True,
              help="Executors added per round while work waits: 1; 1,2,3...; 1,2,4...; or all needed.")
@click.option("--tasks-per-slot", type=click.FloatRange(min=1), default=1.0, show_envvar=True,
              help="Waiting tasks that justify one more slot.")
@click.option("--idle-release", type=click.FloatRange(min=0), default=60.0, show_envvar=True,
              help="Seconds an executor may sit idle before it is released.")
@click.option("--max-lifetime", type=click.FloatRange(min=0), default=0.0, show_envvar=True,
              help="Lease: seconds after which any executor is drained and stopped (0: none).")
@click.option("--budget", type=click.FloatRange(min=0), default=0.0, show_envvar=True, metavar="USD",
              help="Stop growing when the fleet's estimated spend would pass this (0: no cap).")
@click.option("--prices", type=click.Path(dir_okay=False, exists=True), default=None, show_envvar=True,
              help="TOML or JSON table of instance type = USD per hour, over the built-in estimates.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=5.0, show_envvar=True,
              help="Seconds between scaling rounds.")
@click.option("--boot-timeout", type=click.FloatRange(min=1), default=None, show_envvar=True,
              help="Seconds a new executor has to register before its machine is stopped "
                   "[default: 300 on ec2, 600 slurm (a queued job counts as booting), 60 local].")
@click.option("--release-grace", type=click.FloatRange(min=0), default=600.0, show_envvar=True,
              help="Seconds a released executor may take to drain before its machine is stopped.")
@click.option("--stop-grace", type=click.FloatRange(min=0), default=30.0, show_envvar=True,
              help="On stop, seconds for executors to drain before their machines are stopped.")
@click.option("--keep", is_flag=True, show_envvar=True, help="On stop, leave the fleet running.")
@click.option("--slots", type=click.IntRange(min=1), default=None, show_envvar=True,
              help="Slots per executor [default: its CPUs].")
@click.option("--executor-address", default=None, show_envvar=True, metavar="tcp://HOST:PORT",
              callback=check_address,
              help="Where executors reach the dispatcher [default: its executor port as it reports it].")
@click.option("--executor-idle-timeout", type=click.FloatRange(min=0), default=None, show_envvar=True,
              help="Executors leave by themselves after this long idle, a safety net should the "
                   "provisioner die [default: 3600 on ec2, 600 slurm, 0 local].")
@click.option("--cluster", default="falconet", show_envvar=True,
              help="Fleet name: the tag on every instance; one provisioner per name.")
@click.option("--region", default=None, show_envvar=True, help="AWS region [default: the profile's].")
@click.option("--profile", default=None, show_envvar=True, help="AWS profile [default: the standard chain].")
@click.option("--ec2-endpoint-url", default=None, show_envvar=True,
              help="EC2 API endpoint of an EC2-compatible cloud (Eucalyptus, OpenStack) or a test server.")
@click.option("--ami", default="name:falconet-executor-*", show_envvar=True,
              help="ami-ID, name:PATTERN or tag:KEY=VALUE (the newest matching image is used).")
@click.option("--ami-owner", default="self", show_envvar=True, help="Owner of the images --ami searches.")
@click.option("--instance-types", default="c5.large", show_envvar=True,
              help="Comma-separated types to choose from; the cheapest that fits the work is used.")
@click.option("--subnet", default=None, show_envvar=True, help="Subnet id for the instances.")
@click.option("--security-group", multiple=True, show_envvar=True, help="Security group id (repeatable).")
@click.option("--key-name", default=None, show_envvar=True, help="EC2 key pair for SSH (not needed to join).")
@click.option("--iam-profile", default=None, show_envvar=True, help="Instance profile name or ARN.")
@click.option("--spot", is_flag=True, show_envvar=True, help="Request spot instances.")
@click.option("--tag", "tags", multiple=True, show_envvar=True, metavar="KEY=VALUE",
              help="Extra tag on every instance and volume (repeatable).")
@click.option("--executor-tag", "executor_tag", multiple=True, show_envvar=True, metavar="TAG",
              help="Tag the launched executors report, for tasks that need it, such as gpu or "
                   "zone=a (repeatable; site=cloud or site=local is implied by the backend).")
@click.option("--cloud-init", type=click.Path(dir_okay=False, exists=True), default=None, show_envvar=True,
              help="For stock images without the executor baked in: a cloud-config (such as "
                   "ami/cloud-init.yaml) sent with the falconet user-data as one multipart document.")
@click.option("--shutdown-when-idle/--no-shutdown-when-idle", default=True, show_envvar=True,
              help="An EC2 executor that leaves for idleness powers its machine off (terminated).")
@click.option("--clean-orphans", is_flag=True, show_envvar=True,
              help="On start, stop the cluster's instances found by tag instead of adopting them.")
@click.option("--executor-key", default=None, show_envvar=True, metavar="FILE",
              help="Secret key file the executors connect with (executor.key_secret), for a dispatcher "
                   "with --keys; EC2 instances get it in their user-data.")
@click.option("--partition", default=None, show_envvar=True,
              help="slurm: the partition pilots are submitted to [default: the cluster's default].")
@click.option("--account", default=None, show_envvar=True, help="slurm: the account pilots are charged to.")
@click.option("--qos", default=None, show_envvar=True, help="slurm: the quality of service of the pilots.")
@click.option("--job-time", default="1:00:00", show_envvar=True, metavar="TIME",
              help="slurm: each pilot's walltime, in sbatch --time's forms (MINUTES, HH:MM:SS, D-HH:MM); "
                   "its executor stops taking work --end-margin before the end.")
@click.option("--cpus-per-job", type=click.IntRange(min=1), default=None, show_envvar=True,
              help="slurm: cpus each pilot asks for [default: a node's, from sinfo].")
@click.option("--memory-per-job", type=click.IntRange(min=1), default=None, show_envvar=True, metavar="MB",
              help="slurm: memory each pilot asks for, per node [default: Slurm's default for the partition].")
@click.option("--nodes-per-job", type=click.IntRange(min=1), default=1, show_envvar=True,
              help="slurm: nodes of each pilot job, one executor on each (for sites that want large "
                   "jobs); --max-executors and --min-executors count nodes.")
@click.option("--sbatch-option", multiple=True, show_envvar=True, metavar="OPTION",
              help="slurm: another sbatch option for every pilot, such as --constraint=avx2 (repeatable).")
@click.option("--sbatch-prologue", default=None, show_envvar=True, metavar="LINES|@FILE",
              help="slurm: shell lines run in each pilot before the executor, such as "
                   "'module load python' or activating an environment (or @FILE to read them).")
@click.option("--end-margin", type=click.FloatRange(min=0), default=None, show_envvar=True, metavar="SECONDS",
              help="slurm: how long before its job's end an executor stops taking work "
                   "[default: 60, at most a quarter of --job-time].")
@click.option("--job-log-dir", default=None, show_envvar=True, metavar="DIR",
              help="slurm: where the pilots' scripts and output files go; the nodes must see it "
                   "(a shared filesystem) [default: ./falconet-slurm-CLUSTER].")
@client_keys
@log_level
@parent_pid
def provisioner(**opts: Any) -> None:
    """Grow and shrink the executor fleet of a dispatcher by its queue depth.

    Runs until SIGTERM or Ctrl-C, then drains and stops the fleet (unless --keep).
    """
    from falconet.provisioner import launcher

    _logging(opts.pop("log_level"))
    parent = opts.pop("parent_pid")
    try:
        prov = launcher.build(launcher.Options(**opts))
    except FalconetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    signal.signal(signal.SIGTERM, prov.stop)
    signal.signal(signal.SIGINT, prov.stop)
    watch_parent(parent, prov.stop_now)
    click.echo(f"provisioner: cluster {prov.settings.cluster}, backend {prov.backend.name}")
    sys.stdout.flush()
    try:
        prov.run()
    finally:
        prov.client.close()
