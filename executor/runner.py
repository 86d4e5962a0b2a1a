"""Run one task of either kind and turn its outcome into (state, output, reason)."""

from __future__ import annotations

import functools
import logging
import os
import pickle
import selectors
import signal
import subprocess
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from falconet import spawn, tasks
from falconet.errors import ProtocolError
from falconet.executor import reaper
from falconet.protocol import TaskKind, TaskState

log = logging.getLogger("falconet.executor")

DONE, FAILED = int(TaskState.DONE), int(TaskState.FAILED)
_READ_CHUNK = 1 << 16
#: a command ends when its main process exits; what its children still write to its pipes
#: after that is read for this long, then the pipes are closed and the children killed
OUTPUT_GRACE_S = 0.1
_EXIT_POLL_S = 0.01  # without a pidfd (not Linux), how often to look for the main process's exit

Outcome = tuple[int, bytes, str]  # state, output, reason


def run(kind: int, body: bytes, walltime_s: float, functions: FunctionCache, cwd: str | None = None,
        streams: dict[str, str] | None = None, max_output: int = 0) -> Outcome:
    """Run a task body (in cwd, a staged task's work dir); never raises for what the task does.

    streams: {"stdout" or "stderr": path} of a command's streams to write to files, uncapped.
    max_output: a Python task's value that would pickle to more fails, unpickled (0: no limit).
    """
    try:
        if kind == TaskKind.COMMAND:
            return run_command(tasks.decode_command(body), walltime_s, cwd, streams)
        if streams:
            return FAILED, b"", "only command tasks can send stdout or stderr to a file"
        if kind == TaskKind.PYTHON:
            if cwd is None:
                return run_python(body, functions, max_output)
            home = os.getcwd()
            os.chdir(cwd)
            try:
                return run_python(body, functions, max_output)
            finally:
                os.chdir(home)
        return FAILED, b"", f"unknown task kind {kind}: this executor runs command (1) and python (2)"
    except ProtocolError as exc:
        return FAILED, b"", f"task body could not be decoded: {exc}"


# ---------------------------------------------------------------- commands


# Words the shell runs itself, or differently from the program of the same name.
_SHELL_WORDS = frozenset(
    [".", ":", "[", "alias", "bg", "break", "cd", "chdir", "command", "continue", "echo", "eval", "exec", "exit", "export", "fc", "fg", "getopts", "hash", "jobs", "kill", "local", "printf", "pwd", "read", "readonly", "return", "set", "shift", "test", "times", "trap", "type", "ulimit", "umask", "unalias", "unset", "wait"]
)
_SHELL_CHARS = frozenset("|&;<>()$`\\\"' \t\n*?[]#~=%{}!")


@functools.lru_cache(maxsize=4096)
def direct_argv(line: str) -> tuple[str, ...] | None:
    """The argv of a shell line that /bin/sh would only split on spaces and exec, else None.

    Running such a line without the shell saves one exec per task (about half the cost of
    a tiny command); anything with quoting, expansion, redirection or a shell builtin
    still goes through /bin/sh.
    """
    words = line.split(" ")
    if any(not w or _SHELL_CHARS.intersection(w) for w in words) or words[0] in _SHELL_WORDS:
        return None
    return tuple(words)


def run_command(spec: tasks.CommandSpec, walltime_s: float, workdir: str | None = None,
                streams: dict[str, str] | None = None) -> Outcome:
    """Run a command with captured, capped output and an optional wall-time limit.

    A staged task runs in its work dir; a cwd of its own is taken relative to it.  A stream
    named in streams goes straight to that file, whole, and comes back empty in the output.
    """
    try:
        files = _open_streams(streams or {})
    except OSError as exc:
        msg = f"could not open a file for the command's output: {exc}"
        return FAILED, tasks.encode_command_output(126, b"", msg.encode(), False), msg
    spare = reaper.begin()  # children of the slot from before, to leave alone
    try:
        proc = _start(spec, workdir, files)
    except FileNotFoundError as exc:  # as /bin/sh would say it, with its exit status
        reaper.release()
        msg = f"{exc.filename}: {exc.strerror}"
        return FAILED, tasks.encode_command_output(127, b"", msg.encode(), False), "exit code 127"
    except OSError as exc:
        reaper.release()
        msg = f"could not start the command: {exc}"
        return FAILED, tasks.encode_command_output(126, b"", msg.encode(), False), msg
    finally:
        for f in files.values():  # the child has its own copies
            f.close()
    global _running
    _running = proc
    try:
        deadline = time.monotonic() + walltime_s if walltime_s > 0 else None
        out, err, truncated, timed_out = _communicate(proc, spec.stdin, spec.cap, deadline)
        # The main process has exited but is not reaped yet, so its pid still names its
        # group: kill what is left of the group, then reap, then sweep up the escapees.
        spawn.signal_group(proc.pid, signal.SIGKILL)
        code = proc.wait()
    finally:
        _running = None
        escaped = reaper.end(spare, proc.pid)
    if escaped:
        log.warning("killed %d processes that the command %r left behind outside its process group: %s",
                    len(escaped), spec.cmd, ", ".join(escaped))
    output = tasks.encode_command_output(code, out, err, truncated)
    if timed_out:
        return FAILED, output, f"wall time of {walltime_s:g}s exceeded; the command was killed"
    if code != 0:
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return FAILED, output, why
    return DONE, output, ""


def _start(spec: tasks.CommandSpec, workdir: str | None, files: dict[str, Any]) -> subprocess.Popen | Spawned:
    """Start the command in its own session; streams not in files are piped back to us."""
    env = None if spec.env is None else {**os.environ, **spec.env}
    cmd: Any = spec.cmd
    shell = isinstance(cmd, str)
    if shell and (argv := direct_argv(cmd.strip())) is not None:
        cmd, shell = list(argv), False
    if not (spec.stdin or spec.cwd or workdir or (env and "PATH" in spec.env)):
        return _spawn(["/bin/sh", "-c", cmd] if shell else cmd, env, files)
    return subprocess.Popen(
        cmd, shell=shell, env=env, cwd=os.path.join(workdir, spec.cwd or "") if workdir else spec.cwd,
        stdin=subprocess.PIPE if spec.stdin else subprocess.DEVNULL,
        stdout=files.get("stdout", subprocess.PIPE), stderr=files.get("stderr", subprocess.PIPE),
        start_new_session=True,
    )


class Spawned:
    """What _communicate and run_command use of a Popen, for a command from _spawn."""

    __slots__ = ("pid", "stdin", "stdout", "stderr")

    def __init__(self, pid: int, stdout: Any, stderr: Any):
        self.pid, self.stdin, self.stdout, self.stderr = pid, None, stdout, stderr

    def wait(self) -> int:
        """Reap it; its exit code, -N for a signal N (as Popen.returncode)."""
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


_DEVNULL = -1  # opened on first use, kept open: every command's stdin
#: the signals Python ignores and Popen(restore_signals=True) gives back their default
_RESTORED = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name))


def _spawn(argv: list[str], env: dict[str, str] | None, files: dict[str, Any]) -> Spawned:
    """The common case without Popen: no stdin, no cwd, searched on this PATH.

    posix_spawn (a vfork and exec in glibc) with the pipes and the new session set up in
    the child costs about half the CPU of Popen's Python work; the command sees the same
    thing (stdin /dev/null, stdout and stderr piped or to their files, only those
    descriptors, its own session, SIGPIPE at its default).  An exec that fails raises as Popen does.
    """
    global _DEVNULL
    if _DEVNULL < 0:
        _DEVNULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    if env is None:
        env = _current_environ()
    actions = [(os.POSIX_SPAWN_DUP2, _DEVNULL, 0)]
    ours, theirs = [], []
    try:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            f = files.get(name)
            if f is None:
                r, w = os.pipe()  # both close on exec; the child's copy from dup2 does not
                ours.append(r)
                theirs.append(w)
                actions.append((os.POSIX_SPAWN_DUP2, w, fd))
            else:
                actions.append((os.POSIX_SPAWN_DUP2, f.fileno(), fd))
                ours.append(-1)
        pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=_RESTORED)
    except BaseException:
        for fd in ours + theirs:
            if fd >= 0:
                os.close(fd)
        raise
    for w in theirs:
        os.close(w)
    out, err = (open(fd, "rb", buffering=0) if fd >= 0 else None for fd in ours)  # noqa: SIM115 - closed by _communicate
    return Spawned(pid, out, err)


def _current_environ() -> dict:
    """os.environ as a plain dict, without a copy: posix_spawn takes a mapping and converts
    os.environ (a Python mapping, key by key) several times slower than the plain dict of
    bytes behind it, which os.environ keeps current (a Python task may change it)."""
    data = getattr(os.environ, "_data", None)
    return data if type(data) is dict else dict(os.environ)


def _open_streams(streams: dict[str, str]) -> dict[str, Any]:
    """{stream: file open for writing}; none left open if one cannot be opened."""
    files: dict[str, Any] = {}
    try:
        for name, path in streams.items():
            files[name] = open(path, "wb")  # noqa: SIM115 - handed to the child, closed by run_command
    except OSError:
        for f in files.values():
            f.close()
        raise
    return files


def _communicate(proc: subprocess.Popen, stdin: bytes | None, cap: int,
                 deadline: float | None) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin and read the stdout and stderr pipes (None: sent to a file), keeping at
    most cap bytes of each; truncated when either had more.

    Returns once the main process has exited (it is not reaped) and its pipes are closed,
    or OUTPUT_GRACE_S after it exited: a child left behind may hold the pipes open for as
    long as it lives, and the task must not wait for it.
    """
    keep = {f: bytearray() for f in (proc.stdout, proc.stderr) if f is not None}
    truncated = timed_out = False
    exit_fd = _pidfd(proc.pid)
    with selectors.DefaultSelector() as sel:
        for f in keep:
            sel.register(f, selectors.EVENT_READ)
        if exit_fd >= 0:
            sel.register(exit_fd, selectors.EVENT_READ)
        pending = memoryview(stdin or b"")
        if stdin:
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        stop_at = None  # the main process exited: read until its pipes close, or until this
        try:
            while True:
                now = time.monotonic()
                if stop_at is None and exit_fd < 0 and _exited(proc.pid):
                    stop_at = now + OUTPUT_GRACE_S
                if stop_at is not None and (now >= stop_at or not _open(sel, proc)):
                    break
                if deadline is not None and now >= deadline:
                    timed_out, deadline = True, None
                    spawn.signal_group(proc.pid, signal.SIGKILL)
                wait = min([t - now for t in (deadline, stop_at) if t is not None]
                           + ([_EXIT_POLL_S] if exit_fd < 0 else []), default=None)
                for key, _ in sel.select(wait):
                    f = key.fileobj
                    if f == exit_fd:  # an int, registered as such
                        sel.unregister(f)
                        stop_at = time.monotonic() + OUTPUT_GRACE_S
                    elif f is proc.stdin:
                        pending = _feed(sel, f, pending)
                    elif _read(sel, f, keep[f], cap):
                        truncated = True
        finally:
            for f in [proc.stdin, *keep]:
                if f is not None and not f.closed:
                    f.close()
            if exit_fd >= 0:
                os.close(exit_fd)
    return bytes(keep.get(proc.stdout, b"")), bytes(keep.get(proc.stderr, b"")), truncated, timed_out


def _pidfd(pid: int) -> int:
    """A descriptor that becomes readable when the process exits (Linux 5.3), else -1."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return -1


def _exited(pid: int) -> bool:
    """Whether the process has exited, without reaping it."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _open(sel: selectors.BaseSelector, proc: subprocess.Popen) -> bool:
    """Whether an output pipe of the command is still open."""
    return any(f in (proc.stdout, proc.stderr) for f in (k.fileobj for k in sel.get_map().values()))


def _feed(sel: selectors.BaseSelector, f: Any, pending: memoryview) -> memoryview:
    """Write the next part of stdin; close it once all is written or the reader is gone."""
    try:
        pending = pending[os.write(f.fileno(), pending[:_READ_CHUNK]):]
    except BrokenPipeError:
        pending = pending[:0]
    if not pending:
        sel.unregister(f)
        f.close()
    return pending


def _read(sel: selectors.BaseSelector, f: Any, buf: bytearray, cap: int) -> bool:
    """Read what a pipe has, keeping up to cap bytes in buf; True if some was dropped."""
    data = os.read(f.fileno(), _READ_CHUNK)
    if not data:
        sel.unregister(f)
        f.close()
        return False
    room = cap - len(buf)
    buf += data[:max(room, 0)]
    return len(data) > room


_running: subprocess.Popen | None = None  # the command this slot process is running now


def kill_running_command() -> None:
    """Kill the running command's process group and whatever it left with the slot (the
    slot is being stopped)."""
    if _running is not None:
        spawn.signal_group(_running.pid, signal.SIGKILL)
        reaper.kill_all()


# ---------------------------------------------------------------- python


class FunctionCache:
    """Unpickled functions by their pickle, so a map() loads its function once per slot."""

    def __init__(self, size: int = 256):
        self.size = size
        self._fns: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()

    def load(self, data: bytes) -> Callable[..., Any]:
        fn = self._fns.get(data)
        if fn is None:
            fn = pickle.loads(data)
            self._fns[data] = fn
            if len(self._fns) > self.size:
                self._fns.popitem(last=False)
        return fn


def too_large(size: int, limit: int) -> str:
    """The reason of a task whose output passed the dispatcher's limit (worded as the
    dispatcher's own check, which this one spares the copy to it)."""
    return (f"its output of {size} bytes is more than the dispatcher's limit of {limit} (--max-output-bytes); "
            "return less, lower the task's output cap, or send its output to a file")


_BYTES_LIKE = frozenset([bytes, bytearray, str, memoryview])  # pickled, at least their size


def _size(value: bytes | bytearray | str | memoryview) -> int:
    return value.nbytes if type(value) is memoryview else len(value)


def run_python(body: bytes, functions: FunctionCache, max_output: int = 0) -> Outcome:
    """Call a pickled function; its exception, with traceback, is a FAILED outcome.

    A value over max_output bytes fails: a large bytes or str one before it is pickled (a
    copy of it), any other once its pickle is made.
    """
    fn_data, args_data = tasks.decode_python(body)
    try:
        fn = functions.load(fn_data)
        args, kwargs = pickle.loads(args_data)
    except Exception as exc:
        tb = traceback.format_exc()
        return (FAILED, tasks.encode_python_error(exc, tb),
                f"could not load the task's function or arguments on the executor: "
                f"{type(exc).__name__}: {exc}")
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:  # SystemExit too: the task failed, the slot lives on
        tb = traceback.format_exc()
        return FAILED, tasks.encode_python_error(exc, tb), f"{type(exc).__name__}: {exc}"
    if max_output and type(value) in _BYTES_LIKE and _size(value) > max_output:
        return FAILED, b"", too_large(_size(value), max_output)
    try:
        return DONE, tasks.encode_python_value(value), ""
    except Exception as exc:
        msg = f"the return value could not be pickled: {type(exc).__name__}: {exc}"
        return FAILED, tasks.encode_python_error(TypeError(msg), traceback.format_exc()), msg
