"""`falconet events`: a dispatcher's task, executor and fleet events as JSON lines."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time

import click

from falconet.cli.options import client_address, client_keys
from falconet.cli.signals import stop_like_ctrl_c
from falconet.errors import FalconetError

FOLLOW_POLL_S = 0.5
_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
KINDS = {"task": {"submitted", "started", "finished"},
         "executor": {"joined", "drained", "released", "left", "lost"},
         "fleet": {"launched", "terminated"}}


def parse_since(text: str, now: float) -> float:
    """A wall time from '90s', '10m', '2h', '1d' (that long ago), a Unix time or an ISO 8601
    date and time (UTC unless it names its zone); raises ValueError naming the forms."""
    text = text.strip()
    m = _AGO.fullmatch(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: give a time ago (90s, 10m, 2h, 1d), a Unix time or an "
                         "ISO 8601 date and time such as 2026-12-03T14:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


@click.command()
@client_address
@client_keys
@click.option("--follow", "-f", is_flag=True, show_envvar=True,
              help="Keep printing new events as they happen, until Ctrl-C.")
@click.option("--since", default=None, show_envvar=True, metavar="TIME",
              help="Only events from this time on: 10m, 2h, 1d ago, a Unix time or an ISO 8601 "
                   "date and time (UTC unless given) [default: every event kept].")
@click.option("--after", type=click.IntRange(min=0), default=0, show_envvar=True, metavar="N",
              help="Only events numbered above N (each event has its number, n).")
@click.option("--kind", "kinds", type=click.Choice(sorted(KINDS)), multiple=True, show_envvar=True,
              help="Only task, executor or fleet events (repeatable) [default: all].")
def events(dispatcher: str, follow: bool, since: str | None, after: int, kinds: tuple[str, ...]) -> None:
    """Print a dispatcher's events, one JSON object a line, oldest first.

    \b
    Task events: submitted, started, finished (with executor, attempt, outcome,
    wait_s and run_s, and the reason of a failure).  Executor events: joined,
    drained, released, left, lost.  Fleet events (from the provisioner's reports):
    launched, terminated.  The dispatcher keeps the latest --event-history of them
    (with --state-dir, also across a restart); a gap is reported on stderr.
    """
    from falconet.client import Client

    try:
        start = parse_since(since, time.time()) if since else 0.0
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    wanted = set().union(*(KINDS[k] for k in kinds)) if kinds else None
    stop_like_ctrl_c()
    try:
        with Client(dispatcher, name="falconet-events", connect_timeout_s=5) as client:
            _print_events(client, after, start, wanted, follow)
    except FalconetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:  # `falconet events | head`
        sys.stderr.close()
        sys.exit(0)


def _print_events(client: object, after: int, since: float, wanted: set[str] | None, follow: bool) -> None:
    out = sys.stdout
    while True:
        info = client.events(after=after, since=since, limit=2000)  # type: ignore[attr-defined]
        if after and info["first"] > after + 1:
            click.echo(f"warning: events {after + 1} to {info['first'] - 1} are no longer kept "
                       "(--event-history bounds them)", err=True)
        for event in info["events"]:
            if wanted is None or event["event"] in wanted:
                out.write(json.dumps(event, default=str) + "\n")
        out.flush()
        after = info["next"]
        if info.get("more"):
            continue
        if not follow:
            return
        time.sleep(FOLLOW_POLL_S)  # polling the dispatcher: a follower costs it one small request
