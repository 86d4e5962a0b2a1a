"""Commands that need no cluster running: keys (CURVE key files) and bench (the benchmarks)."""

from __future__ import annotations

import sys

import click

from falconet.errors import FalconetError


@click.command()
@click.option("--quick", is_flag=True, show_envvar=True,
              help="Small sizes: a smoke test in under two minutes, not figures to quote.")
@click.option("--out", "out_dir", default="bench-results", show_default=True, show_envvar=True,
              type=click.Path(file_okay=False), help="Folder for results.json, summary.txt and plots.")
@click.option("--only", multiple=True, show_envvar=True,
              type=click.Choice(["throughput", "sleep", "latency", "dispatch", "memory", "scale", "peers",
                                 "provisioning", "engines"]),
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


@click.group()
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

