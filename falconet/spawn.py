"""falconet's own child processes (dispatchers, executors, slots, helpers): their command
lines, and signalling the process groups they lead.

``python -m falconet`` puts the current directory first on ``sys.path``.  Run from a clone
of the repository, that imports the source folder ``./falconet`` instead of the installed
package, and the installed package's subpackages (``falconet.dispatcher`` and the others
come from folders of other names) cannot be found.  Every child falconet starts therefore
runs with the current directory left off ``sys.path`` (``-P`` from Python 3.11; a small
bootstrap before that), whatever the directory and however falconet was installed.  User
code is unaffected: functions from modules outside the installed prefixes travel by value.
"""

from __future__ import annotations

import os
import sys

_SAFE_PATH = sys.version_info >= (3, 11)
_DROP_CWD = "import sys; sys.path.pop(0); "


def module(name: str, *args: str) -> list[str]:
    """argv running `python -m NAME ARGS` without the current directory on sys.path."""
    if _SAFE_PATH:
        return [sys.executable, "-P", "-m", name, *args]
    boot = _DROP_CWD + f"import runpy; runpy.run_module({name!r}, run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", boot, *args]


def code(source: str, *args: str) -> list[str]:
    """argv running `python -c SOURCE ARGS` without the current directory on sys.path."""
    if _SAFE_PATH:
        return [sys.executable, "-P", "-c", source, *args]
    return [sys.executable, "-c", _DROP_CWD + source, *args]


def falconet(*args: str) -> list[str]:
    """argv running the `falconet` command line with ARGS, as installed."""
    return module("falconet", *args)


def signal_group(pgid: int, sig: int) -> None:
    """Signal the process group a child leads (started with start_new_session=True).

    A group already gone is no error.  The caller makes sure pgid is still its child's
    (unreaped, or reaped just now), so the number cannot belong to someone else.
    """
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
