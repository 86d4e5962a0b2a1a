"""The `falconet` command line: a thin layer of click over the library.

Every option can also be set by an environment variable named by one rule: FALCONET_, the
command, and the option's long name, upper case with dashes as underscores (FALCONET_RUN_LOCAL
for `falconet run --local`, FALCONET_KEYS_INIT_FORCE for `falconet keys init --force`).  The
options every client reads also take the names falconet.Client reads: FALCONET_DISPATCHER
(a client address), FALCONET_DISPATCHER_KEY and FALCONET_KEY; the command's own name wins.
Each --help shows the names.

The commands live by concern: `clients` (run, submit, status, executors), `watch` (events), `services`
(dispatcher, executor, provisioner) and `tools` (keys, bench); `options` holds what several
share, `signals` how they stop, `show` the text of status.  This module gathers them under
`main` and names their variables.
"""

from __future__ import annotations

import click

from falconet.cli.clients import _one_place, executors, run, status, submit
from falconet.cli.options import ByteSize, NameWeight, OneLineError
from falconet.cli.services import dispatcher, executor, provisioner
from falconet.cli.signals import Stopped
from falconet.cli.tools import bench, keys
from falconet.cli.watch import events

__all__ = ["main", "variable_names", "SHARED_VARIABLES", "NOT_CLIENTS", "ByteSize", "NameWeight", "OneLineError", "Stopped",
           "run", "submit", "status", "executors", "events", "dispatcher", "executor", "provisioner", "bench", "keys",
           "_one_place"]

CONTEXT = {"auto_envvar_prefix": "FALCONET", "show_default": True, "help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="falconet")
def main() -> None:
    """falconet: run many short tasks fast on a fleet of executors."""


for _command in (run, submit, dispatcher, executor, provisioner, bench, keys, status, executors, events):
    main.add_command(_command)

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
