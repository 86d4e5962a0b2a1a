"""Options more than one command takes, the types and checks behind them.

Their environment variables are named later, by one rule (falconet.cli.variable_names);
the key options' callbacks hand their value on to the variables falconet.Client reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from falconet.errors import AddressError

log_level = click.option("--log-level", default="info", show_envvar=True,
                         type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
                         help="How much to log on stderr.")
parent_pid = click.option("--parent-pid", type=int, default=None, hidden=True,
                          help="Exit when this process is gone (used by embedded clusters).")
as_json = click.option("--json", "as_json", is_flag=True, help="Print the raw statistics as JSON.")


class OneLineError(click.UsageError):
    """A usage error shown as one line, 'error: ...', without the usage text (exit status 2)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def check_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
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
                              callback=check_address,
                              help="The dispatcher's client address (the 'client:' line it printed).")


def _to_env(var: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An option's value becomes the environment variable every Client reads."""
    def callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value:
            os.environ[var] = str(value)
        return value
    return callback


def client_keys(f: Callable) -> Callable:
    """--dispatcher-key and --key: CURVE keys for a dispatcher started with --keys."""
    f = click.option("--key", envvar="FALCONET_KEY", show_envvar=True, expose_value=False,
                     callback=_to_env("FALCONET_KEY"), metavar="FILE",
                     help="This client's secret key file (client.key_secret from 'falconet keys init').")(f)
    return click.option("--dispatcher-key", envvar="FALCONET_DISPATCHER_KEY", show_envvar=True,
                        expose_value=False, callback=_to_env("FALCONET_DISPATCHER_KEY"), metavar="FILE|KEY",
                        help="The dispatcher's public key: its dispatcher.key file or the key text.")(f)


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


def task_options(cpus: int, memory: int, arch: str | None, tags: tuple[str, ...], where: str,
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


class NameWeight(click.ParamType):
    """NAME=W with W > 0: a client name and its share weight (falconet dispatcher --client-weight)."""

    name = "NAME=W"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, float]:
        if isinstance(value, tuple):
            return value
        name, _, w = str(value).rpartition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = -1.0
        if not name or not weight > 0:
            self.fail(f"{value!r}: give NAME=W with a weight above 0, e.g. nightly=0.5", param, ctx)
        return name, weight
