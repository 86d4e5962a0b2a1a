"""The `falconet` command line: a thin layer of click over the library.

Every option can also be set by an environment variable named by one rule: FALCONET_, the
command, and the option's long name, upper case with dashes as underscores (FALCONET_RUN_LOCAL
for `falconet run --local`, FALCONET_KEYS_INIT_FORCE for `falconet keys init --force`).  The
options every client reads also take the names falconet.Client reads: FALCONET_DISPATCHER
(a client address), FALCONET_DISPATCHER_KEY and FALCONET_KEY; the command's own name wins.
Each --help shows the names.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import click

from falconet.errors import AddressError, FalconetError, TaskFileError

CONTEXT = {"auto_envvar_prefix": "FALCONET", "show_default": True, "help_option_names": ["-h", "--help"]}


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _watch_parent(pid: int | None, on_gone: Callable[[], None]) -> None:
    """Call on_gone once the process that started us has exited (embedded clusters)."""
    if not pid:
        return

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(0.5)
        on_gone()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would be so that both take the same way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_like_ctrl_c() -> None:
    """SIGTERM (a batch job's walltime, `timeout`) and SIGHUP (a closed terminal) stop as Ctrl-C does.

    After the first, the signals take their default action again: a second one ends the
    process at once, and the children still leave by themselves (they watch their parent).
    """
    def handler(signum: int, _frame: Any) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        if signum == signal.SIGHUP:
            _detach_terminal()
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _detach_terminal() -> None:
    """Point stdout and stderr that were a hung-up terminal at /dev/null: writes there fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


def _interrupted_status(exc: KeyboardInterrupt) -> int:
    """The shell's status for a run stopped by a signal: 128 + its number (130 for Ctrl-C)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def _strategies() -> list:
    from falconet.provisioner.policy import Strategy

    return list(Strategy)


log_level = click.option("--log-level", default="info", show_envvar=True,
                         type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
                         help="How much to log on stderr.")
parent_pid = click.option("--parent-pid", type=int, default=None, hidden=True,
                          help="Exit when this process is gone (used by embedded clusters).")


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="falconet")
def main() -> None:
    """falconet: run many short tasks fast on a fleet of executors."""


def _to_env(var: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An option's value becomes the environment variable every Client reads."""
    def callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value:
            os.environ[var] = str(value)
        return value
    return callback


class OneLineError(click.UsageError):
    """A usage error shown as one line, 'error: ...', without the usage text (exit status 2)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _check_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An address option's value, checked; a wrong one is one line naming where it came from."""
    if value is None:
        return None
    from falconet import address

    try:
        return address.parse(value).url
    except AddressError as exc:
        raise OneLineError(f"{_given_as(ctx, param)}: {exc}") from None


def _given_as(ctx: click.Context, param: click.Parameter) -> str:
    """The option, or the environment variable its value came from."""
    name = param.name or ""
    if ctx.get_parameter_source(name) is not click.core.ParameterSource.ENVIRONMENT:
        return param.opts[0]
    return param.envvar if isinstance(param.envvar, str) else f"{ctx.auto_envvar_prefix}_{name.upper()}"


client_address = click.option("--dispatcher", required=True, show_envvar=True, metavar="tcp://HOST:PORT",
                              callback=_check_address,
                              help="The dispatcher's client address (the 'client:' line it printed).")


def client_keys(f: Callable) -> Callable:
    """--dispatcher-key and --key: CURVE keys for a dispatcher started with --keys."""
    f = click.option("--key", envvar="FALCONET_KEY", show_envvar=True, expose_value=False,
                     callback=_to_env("FALCONET_KEY"), metavar="FILE",
                     help="This client's secret key file (client.key_secret from 'falconet keys init').")(f)
    return click.option("--dispatcher-key", envvar="FALCONET_DISPATCHER_KEY", show_envvar=True,
                        expose_value=False, callback=_to_env("FALCONET_DISPATCHER_KEY"), metavar="FILE|KEY",
                        help="The dispatcher's public key: its dispatcher.key file or the key text.")(f)



# ---------------------------------------------------------------- run


class ByteSize(click.ParamType):
    """A size in bytes: 4000000, 64k, 10M, 1G (powers of 1024)."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        from falconet.tasks import parse_bytes

        try:
            return parse_bytes(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def output_cap_option(what: str) -> Callable[[Callable], Callable]:
    """--output-cap: bytes of stdout and of stderr kept per command."""
    return click.option("--output-cap", type=ByteSize(), default="1M", show_envvar=True, metavar="BYTES",
                        help=f"Bytes of stdout and of stderr kept for {what}, e.g. 4000000 or 10M (K, M, G: "
                             "powers of 1024); more is cut and the result says truncated. Both streams "
                             "together must fit the dispatcher's --max-output-bytes (64 MiB by default).")


def requirement_options(note: str) -> Callable[[Callable], Callable]:
    """--cpus, --memory, --arch, --tag, --where, --prefer and --input, each help ending in note."""
    options = [
        click.option("--cpus", type=click.IntRange(min=1), default=1, show_envvar=True, metavar="N",
                     help="CPUs each task needs; it goes to an executor with that many free." + note),
        click.option("--memory", type=click.IntRange(min=0), default=0, show_envvar=True, metavar="MB",
                     help="Memory each task needs, in MB (0: any)." + note),
        click.option("--arch", type=click.Choice(["x86_64", "arm64", "amd64", "aarch64"], case_sensitive=False),
                     default=None, show_envvar=True, help="CPU architecture each task needs [default: any]." + note),
        click.option("--tag", "tags", multiple=True, show_envvar=True, metavar="TAG",
                     help="A tag the executor must have, such as gpu or site=cloud (repeatable)." + note),
        click.option("--where", type=click.Choice(["any", "local", "cloud"]), default="any", show_envvar=True,
                     help="Run only on local executors, only on cloud ones, or on any." + note),
        click.option("--prefer", type=click.Choice(["local"]), default=None, show_envvar=True,
                     help="Run on local executors while any has room; burst to the cloud when busy "
                          "(needs --where any)." + note),
        click.option("--input", "inputs", multiple=True, show_envvar=True, metavar="PATH|s3://BUCKET/KEY",
                     help="A file put in each task's work dir under its base name (repeatable; "
                          "relative paths are from the current directory)." + note),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _task_options(cpus: int, memory: int, arch: str | None, tags: tuple[str, ...], where: str,
                  prefer: str | None, inputs: tuple[str, ...], **rest: Any) -> Any:
    """The requirement options as a falconet.taskfile.Options; a bad value is a usage error."""
    from falconet import needs
    from falconet.taskfile import Options

    try:
        wanted = needs.make(cpus=cpus, memory=memory, arch=arch or "", tags=tags, where=where,
                            prefer=prefer or "")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return Options(wanted, tuple(inputs), **rest)


@main.command()
@click.argument("taskfile", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--local", "local_slots", type=click.IntRange(min=1), default=None, show_envvar=True,
              help="Start an embedded dispatcher with this many local executor slots "
                   "[default: the number of CPUs, when --dispatcher is not given].")
@click.option("--dispatcher", default=None, show_envvar=True, metavar="tcp://HOST:PORT", callback=_check_address,
              help="Run on an existing dispatcher (its client address).")
@click.option("--provision", type=click.Choice(["local", "ec2"]), default=None, show_envvar=True,
              help="Start an embedded dispatcher and a provisioner that grows executors with the "
                   "queue and stops them at the end; its options come from --provision-config and "
                   "FALCONET_PROVISIONER_* variables (see falconet provisioner --help).")
@click.option("--provision-config", type=click.Path(dir_okay=False, exists=True), default=None,
              show_envvar=True, help="TOML file with a [provisioner] table, for --provision.")
@click.option("--results", type=click.File("w"), default=None, show_envvar=True,
              help="Write one JSON object per finished task to this file (JSON Lines).")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_envvar=True,
              help="Re-runs allowed when an executor is lost while running a task.")
@click.option("--walltime", type=click.FloatRange(min=0), default=0, show_envvar=True,
              help="Seconds a command may run before it is killed and failed (0: no limit).")
@output_cap_option("each task (a line's output-cap directive overrides it)")
@click.option("--output-dir", default=None, show_envvar=True, metavar="DIR|s3://BUCKET/PREFIX",
              help="Write each task's stdout and stderr whole to DIR/LINE.out and DIR/LINE.err (LINE: "
                   "its line number), even when it fails, instead of keeping them in its result; "
                   "no cap, but files through the dispatcher are limited to 256 MiB (use s3:// for more).")
@click.option("--show-output", is_flag=True, show_envvar=True,
              help="Print each task's stdout on stdout as it finishes, every line prefixed with "
                   "[LINE], the task's line number in TASKFILE.")
@click.option("--quiet", "-q", is_flag=True, show_envvar=True, help="No progress bar.")
@requirement_options(" Lines under a #falconet directive use the directive's instead.")
@client_keys
def run(taskfile: str, local_slots: int | None, dispatcher: str | None, provision: str | None,
        provision_config: str | None, results: Any, retries: int, walltime: float, output_cap: int,
        output_dir: str | None, show_output: bool, quiet: bool, **requirements: Any) -> None:
    """Run every line of TASKFILE as a shell command ('-' reads standard input).

    \b
    Blank lines and lines starting with # are skipped, except directives:
      #falconet cpus=4 memory=8000 tag=gpu input=ref.fa retries=1 walltime=60
    sets the options of the lines after it, up to the next directive;
    '#falconet reset' goes back to the command line's.  Keys: cpus, memory (MB),
    arch, tag (repeatable), tags (comma list), where, prefer, input (repeatable),
    retries, walltime, output-cap.  A directive replaces --cpus, --memory, --arch,
    --tag, --where, --prefer and --input entirely for its lines; --retries,
    --walltime and --output-cap still apply where it sets none.

    Each task keeps 1 MiB of stdout and of stderr by default; the summary says
    how many were cut.  --output-cap raises the cap, --output-dir keeps it all.

    Exits 0 when every task succeeded, 1 when any failed, 2 on a usage error.
    """
    from falconet import runfile
    from falconet import taskfile as tf
    from falconet.client import Client
    from falconet.local import local as local_cluster

    local_slots, dispatcher, provision = _one_place(local_slots=local_slots, dispatcher=dispatcher,
                                                    provision=provision)
    defaults = _task_options(**requirements)
    _check_output_dir(output_dir)
    source = "<stdin>" if taskfile == "-" else taskfile
    try:
        lines = tf.parse(sys.stdin.read(), source) if taskfile == "-" else tf.read(taskfile)
        runfile.check_inputs(lines, defaults, source)
    except TaskFileError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if not lines:
        click.echo(f"{taskfile}: no tasks (every line is blank or a comment)", err=True)
        sys.exit(0)
    progress = None if quiet else sys.stderr
    tally = runfile.Tally(len(lines))
    _stop_like_ctrl_c()

    def go(client: Client) -> None:
        runfile.run_tasks(client, lines, tally, results=results, progress=progress, retries=retries,
                          walltime_s=walltime, output_cap=output_cap, output_dir=output_dir,
                          defaults=defaults, show_output=sys.stdout if show_output else None,
                          provisioned=bool(provision))

    try:
        if dispatcher:
            client = Client(dispatcher, name="falconet-run")
            try:
                go(client)
            except KeyboardInterrupt:
                client.close(cancel=True)  # do not leave the rest queued on a shared dispatcher
                raise
            finally:
                client.close()
        elif provision:
            from falconet.elastic import provision as elastic

            with elastic(provision, config=provision_config, client_name="falconet-run") as client:
                go(client)
        else:
            with local_cluster(slots=local_slots or os.cpu_count(), name="falconet-run") as client:
                go(client)
    except FalconetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        click.echo(f"\ninterrupted: {runfile.summary(tally)}", err=True)
        sys.exit(_interrupted_status(exc))
    click.echo(runfile.summary(tally), err=True)
    sys.exit(1 if tally.failed else 0)


def _one_place(**given: Any) -> tuple:
    """The values of --local, --dispatcher and --provision, at most one of them set.

    One given on the command line wins over others from the environment (a shell with
    FALCONET_DISPATCHER exported can still `falconet run --local 4`); two on the same
    footing are a usage error.
    """
    from click.core import ParameterSource

    ctx = click.get_current_context()
    chosen = {k: v for k, v in given.items() if v}
    typed = {k for k in chosen if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
    if typed:
        chosen = {k: v for k, v in chosen.items() if k in typed}
    if len(chosen) > 1:
        raise click.UsageError("give one of --local N, --dispatcher ADDR and --provision BACKEND")
    return tuple(chosen.get(k) for k in given)


def _check_output_dir(output_dir: str | None) -> None:
    """Make a local --output-dir now, so a bad one is a usage error before anything runs."""
    if not output_dir:
        return
    from falconet import staging

    try:
        if output_dir.startswith("s3://"):
            staging.parse_s3(output_dir.rstrip("/") + "/1.out")
        else:
            os.makedirs(output_dir, exist_ok=True)
    except (OSError, FalconetError) as exc:
        raise click.UsageError(f"--output-dir {output_dir}: {getattr(exc, 'strerror', None) or exc}") from None


@main.command(context_settings={"allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True)
@client_address
@requirement_options("")
@click.option("--output", "outputs", multiple=True, show_envvar=True, metavar="NAME[=DEST]",
              help="A file the command leaves in its work dir, delivered to ./NAME, or to DEST: a "
                   "path or an s3://BUCKET/KEY URL (repeatable).")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_envvar=True,
              help="Re-runs allowed when an executor is lost while running the task.")
@click.option("--walltime", type=click.FloatRange(min=0), default=0, show_envvar=True,
              help="Seconds the command may run before it is killed and failed (0: no limit).")
@output_cap_option("the command")
@click.option("--stdout", "stdout_file", default=None, show_envvar=True, metavar="FILE|s3://BUCKET/KEY",
              help="Write the command's stdout whole to this file (even if it fails) instead of printing it; "
                   "at most 256 MiB unless it is an s3:// URL.")
@click.option("--stderr", "stderr_file", default=None, show_envvar=True, metavar="FILE|s3://BUCKET/KEY",
              help="The same for its stderr.")
@click.option("--json", "as_json", is_flag=True, show_envvar=True,
              help="Print the result record (state, exit code, output, executor...) as JSON instead.")
@client_keys
def submit(command: tuple[str, ...], dispatcher: str, outputs: tuple[str, ...], retries: int,
           walltime: float, output_cap: int, stdout_file: str | None, stderr_file: str | None,
           as_json: bool, **requirements: Any) -> None:
    """Run one COMMAND on a dispatcher's executors and wait for it.

    \b
      falconet submit --cpus 4 --input ref.fa --output out.txt -- align ref.fa
      falconet submit --output counts.txt 'sort big.txt | uniq -c > counts.txt'

    Options come before COMMAND.  Several words run as an argv (put -- before
    them when the first starts with -); one word runs through /bin/sh -c.
    Prints the command's stdout and stderr and exits with its exit code (128+N
    if killed by signal N, as by --walltime; 1 if it could not run, e.g.
    unschedulable, or if it exited 0 but failed, e.g. a missing --output; 2 on
    a usage error).  Any reason other than the exit code is printed on stderr.
    Output is cut at --output-cap (1 MiB) with a warning; --stdout and --stderr
    keep it whole in files.
    """
    from falconet import runfile
    from falconet.client import Client

    options = _task_options(**requirements)
    outs = [runfile.output_spec(text) for text in outputs]
    streams = {"stdout": stdout_file, "stderr": stderr_file}
    try:
        runfile.check_files(options.inputs, outs, streams)
    except FalconetError as exc:
        raise click.UsageError(str(exc)) from None
    cmd: str | list[str] = command[0] if len(command) == 1 else list(command)
    _stop_like_ctrl_c()
    try:
        with Client(dispatcher, name="falconet-submit") as client:
            try:
                rec = runfile.submit_one(client, cmd, options, outputs=outs, retries=retries, walltime_s=walltime,
                                         output_cap=output_cap, stdout=stdout_file, stderr=stderr_file)
            except KeyboardInterrupt:
                client.close(cancel=True)
                raise
    except FalconetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        sys.exit(_interrupted_status(exc))
    if as_json:
        click.echo(json.dumps(rec))
    else:
        sys.stdout.write(rec["stdout"])
        sys.stderr.write(rec["stderr"])
        note = runfile.failure_note(rec)
        if note:
            click.echo(f"error: {note}", err=True)
    if rec.get("truncated"):
        warning = runfile.truncation_warning("its output was", {output_cap}, "--stdout/--stderr FILE")
        click.echo(f"warning: {warning}", err=True)
    sys.exit(runfile.exit_status(rec))


# ---------------------------------------------------------------- services


@main.command()
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
@log_level
@parent_pid
def dispatcher(host: str, client_port: int, executor_port: int, heartbeat_interval: float,
               heartbeat_timeout: float, max_message_bytes: int, max_task_bytes: int,
               max_output_bytes: int, max_submit_batch: int, state_dir: str | None, compact_mb: int,
               keys_dir: str | None, insecure: bool, fail_unschedulable: float, reserve_after: float,
               max_blob_store_mb: int, log_level: str, parent_pid: int | None) -> None:
    """Run a dispatcher; prints 'client: ADDR' and 'executor: ADDR', then serves."""
    from falconet.dispatcher import server
    from falconet.dispatcher.core import Config

    _logging(log_level)
    if heartbeat_timeout <= heartbeat_interval:
        raise click.UsageError("--heartbeat-timeout must be longer than --heartbeat-interval")
    config = Config(heartbeat_interval_s=heartbeat_interval, heartbeat_timeout_s=heartbeat_timeout,
                    max_message_bytes=max_message_bytes, max_task_bytes=max_task_bytes,
                    max_output_bytes=max_output_bytes, max_submit_batch=max_submit_batch,
                    fail_unschedulable_s=fail_unschedulable, reserve_after_s=reserve_after)
    try:
        srv = server.Server(host, client_port, executor_port, config, insecure=insecure,
                            state_dir=state_dir, compact_bytes=compact_mb << 20, keys_dir=keys_dir,
                            blob_store_bytes=max_blob_store_mb << 20)
    except (FalconetError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    signal.signal(signal.SIGTERM, srv.stop)
    signal.signal(signal.SIGINT, srv.stop)
    _watch_parent(parent_pid, srv.stop)
    click.echo(f"client: {srv.client_address}")
    click.echo(f"executor: {srv.executor_address}")
    sys.stdout.flush()
    srv.serve()


@main.command()
@click.option("--dispatcher", default=None, show_envvar=True, metavar="tcp://HOST:PORT", callback=_check_address,
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
@log_level
@parent_pid
def executor(dispatcher: str | None, slots: int | None, idle_timeout: float | None,
             prefetch: int | None, executor_id: str, from_metadata: bool, metadata_url: str,
             metadata_timeout: float, dispatcher_key: str | None, key: str | None, shutdown_command: str,
             cpus: int | None, memory: int | None, tags: tuple[str, ...], work_dir: str, cache_mb: int,
             log_level: str, parent_pid: int | None) -> None:
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
                           memory_mb=memory, tags=tuple(tags), work_dir=work_dir, cache_mb=cache_mb)
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
    _watch_parent(parent_pid, ex.request_stop)  # the embedded run that wanted the results is gone
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


@main.command()
@click.option("--config", type=click.Path(dir_okay=False, exists=True), callback=_config_file,
              is_eager=True, expose_value=False, show_envvar=True,
              help="TOML file whose [provisioner] table gives defaults for these options.")
@click.option("--dispatcher", required=True, show_envvar=True, metavar="tcp://HOST:PORT", callback=_check_address,
              help="The dispatcher's client address.")
@click.option("--backend", type=click.Choice(["local", "ec2"]), default="local", show_envvar=True,
              help="Where executors run: processes on this machine, or EC2 instances.")
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
                   "[default: 300 on ec2, 60 local].")
@click.option("--release-grace", type=click.FloatRange(min=0), default=600.0, show_envvar=True,
              help="Seconds a released executor may take to drain before its machine is stopped.")
@click.option("--stop-grace", type=click.FloatRange(min=0), default=30.0, show_envvar=True,
              help="On stop, seconds for executors to drain before their machines are stopped.")
@click.option("--keep", is_flag=True, show_envvar=True, help="On stop, leave the fleet running.")
@click.option("--slots", type=click.IntRange(min=1), default=None, show_envvar=True,
              help="Slots per executor [default: its CPUs].")
@click.option("--executor-address", default=None, show_envvar=True, metavar="tcp://HOST:PORT",
              callback=_check_address,
              help="Where executors reach the dispatcher [default: its executor port as it reports it].")
@click.option("--executor-idle-timeout", type=click.FloatRange(min=0), default=None, show_envvar=True,
              help="Executors leave by themselves after this long idle, a safety net should the "
                   "provisioner die [default: 3600 on ec2, 0 local].")
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
    _watch_parent(parent, prov.stop_now)
    click.echo(f"provisioner: cluster {prov.settings.cluster}, backend {prov.backend.name}")
    sys.stdout.flush()
    try:
        prov.run()
    finally:
        prov.client.close()


# ---------------------------------------------------------------- benchmarks


@main.command()
@click.option("--quick", is_flag=True, show_envvar=True,
              help="Small sizes: a smoke test in under two minutes, not figures to quote.")
@click.option("--out", "out_dir", default="bench-results", show_default=True, show_envvar=True,
              type=click.Path(file_okay=False), help="Folder for results.json, summary.txt and plots.")
@click.option("--only", multiple=True, show_envvar=True,
              type=click.Choice(["throughput", "sleep", "latency", "dispatch", "memory", "scale", "peers",
                                 "provisioning"]),
              help="Run only these workloads (repeatable).")
def bench(quick: bool, out_dir: str, only: tuple[str, ...]) -> None:
    """Measure throughput, efficiency, latency, the dispatcher's ceiling, memory, scale, and
    scale-out from an empty fleet under each provisioning policy (on a simulated EC2).

    Peers (ProcessPoolExecutor, and Parsl and Dask when installed: pip install
    'falconet[peers]') run the same workloads in the same run; plots need 'falconet[bench]'.
    """
    from falconet.benchmarks import harness

    harness.main(quick, out_dir, only)


# ---------------------------------------------------------------- keys


@main.group()
def keys() -> None:
    """CURVE keys: the dispatcher's pair and the client and executor keys it lets in."""


@keys.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace key files that already exist.")
def keys_init(directory: str, force: bool) -> None:
    """Make DIRECTORY with the dispatcher's, a client's and an executor's key pairs.

    Start the dispatcher with --keys DIRECTORY; give clients --dispatcher-key
    DIRECTORY/dispatcher.key --key DIRECTORY/client.key_secret, and executors the same
    with executor.key_secret.  Secret files are mode 0600: copy them with care.
    """
    from falconet import keys as k

    try:
        made = k.init(directory, force=force)
    except FalconetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    for name, path in made.items():
        click.echo(f"{name}: {path}")


@keys.command("add")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.argument("role", type=click.Choice(["client", "executor"]))
@click.argument("name")
@click.option("--force", is_flag=True, help="Replace the pair if it exists.")
def keys_add(directory: str, role: str, name: str, force: bool) -> None:
    """Make one more key pair NAME for ROLE and authorize it (no dispatcher restart needed)."""
    from falconet import keys as k

    try:
        public, secret = k.add_key(directory, role, name, force=force)
    except (FalconetError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"public: {public}\nsecret: {secret}")


# ---------------------------------------------------------------- queries


def _status(address: str, detail: bool) -> dict:
    from falconet.client import Client

    try:
        with Client(address, name="falconet-status", connect_timeout_s=5) as client:
            return client.status(detail=detail, timeout_s=5)
    except FalconetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


as_json = click.option("--json", "as_json", is_flag=True, help="Print the raw statistics as JSON.")


@main.command()
@client_address
@client_keys
@as_json
def status(dispatcher: str, as_json: bool) -> None:
    """Queue depth, tasks by state, tasks/s and the executors of a dispatcher."""
    info = _status(dispatcher, detail=True)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    tasks = info["tasks"]
    click.echo(f"dispatcher {info['dispatcher_id']}  up {info['uptime_s']:.0f}s  "
               f"transport: {info.get('security', {}).get('mode', 'plain')}")
    click.echo(f"state: {_durability(info)}")
    click.echo(f"queued {info['queued']}  dispatched {tasks['dispatched']} (held, not started)  "
               f"running {tasks['running']}  done {tasks['done']}  failed {tasks['failed']}  "
               f"cancelled {tasks['cancelled']}")
    click.echo(f"{info['tasks_per_s']:.1f} tasks/s (last 10s)  submitted {info['submitted_total']}  "
               f"executors {info['executors']} ({info['slots']} slots, {tasks['running']} running, "
               f"{info['busy']} assigned)  lost {info['lost_executors']}")
    _placement(info)
    if info.get("executor_table"):
        click.echo("")
        _executor_table(info["executor_table"])
    if info.get("fleet"):
        click.echo("")
        _fleet(info["fleet"])


def _placement(info: dict) -> None:
    """Queued tasks by requirements, unschedulable ones with the reason, staged files."""
    from falconet import needs

    waiting = info.get("waiting", [])
    if any(w["needs"] != needs.PLAIN.to_dict() for w in waiting):
        for w in waiting:
            n = needs.make(**{k if k != "memory_mb" else "memory": v for k, v in w["needs"].items()})
            click.echo(f"waiting {w['count']} needing {n}  (oldest {w['oldest_s']:.0f}s)")
    for u in info.get("unschedulable", []):
        click.echo(f"UNSCHEDULABLE {u['count']} tasks for {u['since_s']:.0f}s: {u['reason']}")
    cache, blobs = info.get("input_cache", {}), info.get("blobs", {})
    if cache.get("hits") or cache.get("misses") or blobs.get("blobs"):
        click.echo(f"input cache: {cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses, "
                   f"{cache.get('bytes_fetched', 0) / 1e6:.1f} MB fetched  blob store: {blobs.get('blobs', 0)} "
                   f"files, {blobs.get('bytes', 0) / 1e6:.1f} MB, {blobs.get('fetches', 0)} fetches served")


def _durability(info: dict) -> str:
    """'in memory (lost on a restart)' or 'journal in DIR (N MB)'."""
    if info["durability"] != "journal":
        return "in memory (tasks are lost if the dispatcher stops; --state-dir keeps a journal)"
    j = info["journal"]
    text = f"journal in {j['state_dir']} ({j['journal_bytes'] / 1e6:.1f} MB)"
    return text + (f"; recovered a torn tail at start: {j['recovered']}" if j.get("recovered") else "")


def _fleet(f: dict) -> None:
    """The provisioner's picture: counts, nodes, spend, and its last decisions with reasons."""
    c = f["counts"]
    budget = f"  budget ${f['budget_usd']:.2f}" if f.get("budget_usd") else ""
    click.echo(f"fleet {f['cluster']} ({f['backend']}, {f['policy']}, {f['min_executors']}-"
               f"{f['max_executors']} executors)  reported {f['reported_s']:.0f}s ago")
    click.echo(f"requested {c['requested']}  booting {c['booting']}  registered {f['registered']} "
               f"(idle {c['idle']}, busy {c['busy']})  releasing {c['releasing']}  "
               f"spent ~${f['spent_usd']:.2f}{budget}")
    if f.get("launch_failures") or f.get("last_error"):
        backoff = f"; next launch in {f['backoff_s']:.0f}s" if f.get("backoff_s") else ""
        click.echo(f"launch failures {f['launch_failures']}{backoff}  last error: {f['last_error']}")
    for why in f.get("unschedulable", []):
        click.echo(f"no instance type for: {why}")  # this backend's view; the dispatcher's is above
    if f.get("nodes"):
        table = [("NODE", "TYPE", "STATE", "AGE", "ADDRESS")] + [
            (n["id"], n["type"], n["state"], f"{n['age_s']:.0f}s", n["address"] or "-") for n in f["nodes"]]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        for row in table:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for d in f.get("decisions", [])[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(d["at"]))
        again = f" (x{d['repeats']})" if d.get("repeats") else ""
        for line in d["reasons"]:
            click.echo(f"{when}{again}  {line}")


@main.command()
@client_address
@client_keys
@as_json
def executors(dispatcher: str, as_json: bool) -> None:
    """The executors registered with a dispatcher."""
    rows = _status(dispatcher, detail=True).get("executor_table", [])
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    elif not rows:
        click.echo("no executors registered")
    else:
        _executor_table(rows)


def _executor_table(rows: list[dict]) -> None:
    """RUNNING counts started tasks; ASSIGNED adds those held for the slots (prefetched)."""
    header = ("ID", "HOST", "ADDRESSES", "SLOTS", "CPUS", "MEMORY", "RUNNING", "ASSIGNED", "DONE", "STATE",
              "TAGS", "SEEN")
    table = [header] + [
        (r["id"], r["host"], ",".join(r["addresses"]) or "-", str(r["slots"]), str(r["cpus"]),
         f"{r['memory_mb']} MB", str(r["busy"]), str(r["assigned"]), str(r["completed"]),
         r["state"], ",".join(r.get("tags", [])) or "-", f"{r['last_seen_s']:.1f}s ago")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


# ---------------------------------------------------------------- environment variables

#: Shared names of options that every client takes, as falconet.Client reads them.
SHARED_VARIABLES = {"--dispatcher": "FALCONET_DISPATCHER", "--dispatcher-key": "FALCONET_DISPATCHER_KEY",
                    "--key": "FALCONET_KEY"}
#: Commands whose --dispatcher is not a client address (the executor's is the executor port).
NOT_CLIENTS = {("executor", "--dispatcher")}


def variable_names(group: click.Group, path: tuple[str, ...] = ("FALCONET",)) -> None:
    """Give every option of every command its environment variables, by the one rule."""
    for name, cmd in group.commands.items():
        here = (*path, name.upper().replace("-", "_"))
        if isinstance(cmd, click.Group):
            variable_names(cmd, here)
            continue
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.name in ("help", "version"):
                continue
            flag = max(param.opts, key=len)
            names = ["_".join(here) + "_" + flag.lstrip("-").replace("-", "_").upper()]
            if flag in SHARED_VARIABLES and (name, flag) not in NOT_CLIENTS:
                names.append(SHARED_VARIABLES[flag])
            param.envvar, param.show_envvar = names if len(names) > 1 else names[0], True


variable_names(main)

if __name__ == "__main__":
    main()
