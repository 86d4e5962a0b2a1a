"""How the commands stop: SIGTERM and SIGHUP taken like Ctrl-C, the exit status they give,
and a parent process that is gone (embedded clusters)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would be so that both take the same way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_like_ctrl_c() -> None:
    """SIGTERM (a batch job's walltime, `timeout`) and SIGHUP (a closed terminal) stop as Ctrl-C does.

    After the first, the signals take their default action again: a second one ends the
    process at once, and the children still leave by themselves (they watch their parent).
    """
    def handler(signum: int, _frame: Any) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        if signum == signal.SIGHUP:
            detach_terminal()
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def detach_terminal() -> None:
    """Point stdout and stderr that were a hung-up terminal at /dev/null: writes there fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


def interrupted_status(exc: KeyboardInterrupt) -> int:
    """The shell's status for a run stopped by a signal: 128 + its number (130 for Ctrl-C)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def watch_parent(pid: int | None, on_gone: Callable[[], None]) -> None:
    """Call on_gone once the process that started us has exited (embedded clusters)."""
    if not pid:
        return

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(0.5)
        on_gone()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
