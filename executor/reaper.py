"""What a command leaves behind: the slot as a subreaper while a command runs, and the sweep
that kills every process the command started once it ends.

A command runs in its own session and process group; killing the group when it ends takes
its ordinary background jobs (``sleep 300 &``).  A process that left the group (``setsid``,
a daemon's double fork, a job-control shell's jobs) is not in it.  On Linux the slot marks
itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``) while the command runs, so
such a process, once its parent ends, becomes a child of the slot instead of init's: the
sweep finds it among the slot's children and kills it.  Children the slot had before the
command (a Python task's pool, kept on purpose) are left alone.

Elsewhere (no prctl, or no ``/proc/PID/task/TID/children``) only the group is killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36
SWEEP_LIMIT_S = 2.0  # a process stuck in the kernel (D state) may not die at once; give up then


def _prctl() -> ctypes._CFuncPtr | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return fn if os.path.exists(f"/proc/{os.getpid()}/task") else None


_PRCTL = _prctl()


def _set_subreaper(on: bool) -> bool:
    return _PRCTL is not None and _PRCTL(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def children() -> set[int]:
    """This process's children, from every thread's /proc children list (empty if unknown)."""
    found: set[int] = set()
    base = f"/proc/{os.getpid()}/task"
    try:
        threads = os.listdir(base)
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"{base}/{tid}/children", "rb") as f:
                found.update(map(int, f.read().split()))
        except OSError:
            continue
    return found


def begin() -> frozenset[int] | None:
    """Before a command: become a subreaper; the children to spare, or None when unsupported."""
    if not _set_subreaper(True):
        return None
    return _NONE if childless() else frozenset(children())


_NONE: frozenset[int] = frozenset()


def childless() -> bool:
    """True when this process has no child at all, running or not yet reaped: one system
    call, where children() reads /proc once per thread (the usual case: nothing to sweep)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def end(before: frozenset[int] | None, pgid: int) -> list[str]:
    """After the command (its leader reaped): kill and reap every child that was not there
    before, until none is left and the group `pgid` is gone; stop being a subreaper.

    Returns "PID (NAME)" of each process killed that was outside the command's group (it
    had escaped it); processes of the group are expected leftovers and not listed.
    """
    if before is None:
        return []
    try:
        return _sweep(before, pgid, time.monotonic() + SWEEP_LIMIT_S)
    finally:
        _set_subreaper(False)


def _sweep(before: frozenset[int], pgid: int, give_up: float) -> list[str]:
    escaped: list[str] = []
    killed: set[int] = set()
    while True:
        found = set() if childless() else children() - before
        for pid in found - killed:
            if _pgid(pid) not in (pgid, -1):
                escaped.append(f"{pid} ({_name(pid)})")
            _kill(pid)
            killed.add(pid)
        for pid in list(killed):
            if _reaped(pid):
                killed.discard(pid)
        if not found and not _group_alive(pgid):
            return escaped
        if time.monotonic() > give_up:
            escaped.append(f"gave up after {SWEEP_LIMIT_S:g}s: {sorted(found)} still alive")
            return escaped
        if not found:  # members of the group are still dying; their orphans come here next
            time.sleep(0.001)


def release() -> None:
    """The command could not start: stop being a subreaper."""
    _set_subreaper(False)


def kill_all() -> None:
    """The slot is being stopped: SIGKILL every child it has (a last, quick round)."""
    for pid in children():
        _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
