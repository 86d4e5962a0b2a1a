"""The commands that are clients of a dispatcher: run (a task file), submit (one command),
status and executors (what a dispatcher reports)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from falconet.cli import show
from falconet.cli.options import (
    as_json,
    check_address,
    client_address,
    client_keys,
    output_cap_option,
    requirement_options,
    task_options,
)
from falconet.cli.signals import interrupted_status, stop_like_ctrl_c
from falconet.errors import FalconetError, TaskFileError
from falconet.reports import Status

# ---------------------------------------------------------------- run


@click.command()
@click.argument("taskfile", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--local", "local_slots", type=click.IntRange(min=1), default=None, show_envvar=True,
              help="Start an embedded dispatcher with this many local executor slots "
                   "[default: the number of CPUs, when --dispatcher is not given].")
@click.option("--dispatcher", default=None, show_envvar=True, metavar="tcp://HOST:PORT", callback=check_address,
              help="Run on an existing dispatcher (its client address).")
@click.option("--provision", type=click.Choice(["local", "ec2", "slurm"]), default=None, show_envvar=True,
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
@click.option("--dashboard", is_flag=True, show_envvar=True,
              help="With --local or --provision: the embedded dispatcher serves its live dashboard "
                   "and /metrics on a free loopback port, printed as 'dashboard: URL'.")
@requirement_options(" Lines under a #falconet directive use the directive's instead.")
@client_keys
def run(taskfile: str, local_slots: int | None, dispatcher: str | None, provision: str | None,
        provision_config: str | None, results: Any, retries: int, walltime: float, output_cap: int,
        output_dir: str | None, show_output: bool, quiet: bool, dashboard: bool, **requirements: Any) -> None:
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

    local_slots, dispatcher, provision = _one_place(local_slots=local_slots, dispatcher=dispatcher,
                                                    provision=provision)
    if dashboard and dispatcher:
        raise click.UsageError("--dashboard starts with an embedded dispatcher (--local, --provision); "
                               "start your own dispatcher with --http-port to see its dashboard")
    defaults = task_options(**requirements)
    _check_output_dir(output_dir)
    lines = _read_tasks(taskfile, defaults)
    progress = None if quiet else sys.stderr
    tally = runfile.Tally(len(lines))
    stop_like_ctrl_c()
    try:
        with _client(dispatcher, provision, provision_config, local_slots, dashboard) as client:
            if client.dashboard_url:
                click.echo(f"dashboard: {client.dashboard_url}", err=True)
            runfile.run_tasks(client, lines, tally, results=results, progress=progress, retries=retries,
                              walltime_s=walltime, output_cap=output_cap, output_dir=output_dir,
                              defaults=defaults, show_output=sys.stdout if show_output else None,
                              provisioned=bool(provision))
    except FalconetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        click.echo(f"\ninterrupted: {runfile.summary(tally)}", err=True)
        sys.exit(interrupted_status(exc))
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


def _read_tasks(taskfile: str, defaults: Any) -> list:
    """TASKFILE's tasks, their input files checked; exit 2 on a bad one, 0 when there are none."""
    from falconet import runfile
    from falconet import taskfile as tf

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
    return lines


@contextmanager
def _client(dispatcher: str | None, provision: str | None, provision_config: str | None,
            local_slots: int | None, dashboard: bool = False) -> Iterator[Any]:
    """A client of the one place chosen: an existing dispatcher, a provisioned or a local cluster."""
    from falconet.client import Client
    from falconet.local import local as local_cluster

    if dispatcher:
        client = Client(dispatcher, name="falconet-run")
        try:
            yield client
        except KeyboardInterrupt:
            client.close(cancel=True, wait=False)  # do not leave the rest queued on a shared dispatcher
            raise
        finally:
            client.close()
    elif provision:
        from falconet.elastic import provision as elastic

        with elastic(provision, config=provision_config, client_name="falconet-run", dashboard=dashboard) as client:
            yield client
    else:
        with local_cluster(slots=local_slots or os.cpu_count(), dashboard=dashboard, name="falconet-run") as client:
            yield client


# ---------------------------------------------------------------- submit


@click.command(context_settings={"allow_interspersed_args": False})
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

    options = task_options(**requirements)
    outs = [runfile.output_spec(text) for text in outputs]
    streams = {"stdout": stdout_file, "stderr": stderr_file}
    try:
        runfile.check_files(options.inputs, outs, streams)
    except FalconetError as exc:
        raise click.UsageError(str(exc)) from None
    cmd: str | list[str] = command[0] if len(command) == 1 else list(command)
    stop_like_ctrl_c()
    try:
        with Client(dispatcher, name="falconet-submit") as client:
            try:
                rec = runfile.submit_one(client, cmd, options, outputs=outs, retries=retries, walltime_s=walltime,
                                         output_cap=output_cap, stdout=stdout_file, stderr=stderr_file)
            except KeyboardInterrupt:
                client.close(cancel=True, wait=False)
                raise
    except FalconetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        sys.exit(interrupted_status(exc))
    _print_result(rec, as_json, output_cap)
    sys.exit(runfile.exit_status(rec))


def _print_result(rec: dict, as_json: bool, output_cap: int) -> None:
    """The result record as JSON, or the command's output and why it failed; a cut is warned of."""
    from falconet import runfile

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


# ---------------------------------------------------------------- queries


def _status(address: str) -> dict:
    """The dispatcher's status map (with the executor table), or exit 1 saying why not."""
    from falconet.client import Client

    try:
        with Client(address, name="falconet-status", connect_timeout_s=5) as client:
            return client.status(detail=True, timeout_s=5)
    except FalconetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def _typed(info: dict) -> Status:
    try:
        return Status.from_map(info)
    except FalconetError as exc:
        click.echo(f"error: the dispatcher's status is not what this falconet reads: {exc}", err=True)
        sys.exit(1)


@click.command()
@client_address
@client_keys
@as_json
def status(dispatcher: str, as_json: bool) -> None:
    """Queue depth, tasks by state, tasks/s and the executors of a dispatcher."""
    info = _status(dispatcher)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    show.status(_typed(info))


@click.command()
@client_address
@client_keys
@as_json
def executors(dispatcher: str, as_json: bool) -> None:
    """The executors registered with a dispatcher."""
    rows = _typed(_status(dispatcher)).executor_table
    if as_json:
        click.echo(json.dumps([r.to_map() for r in rows], indent=2, default=str))
    elif not rows:
        click.echo("no executors registered")
    else:
        show.executor_table(rows)
