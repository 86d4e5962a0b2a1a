"""Run one task of either kind and turn its outcome into (state, output, reason)."""

from __future__ import annotations

import functools
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
from falconet.protocol import TaskKind, TaskState

DONE, FAILED = int(TaskState.DONE), int(TaskState.FAILED)
_READ_CHUNK = 1 << 16

Outcome = tuple[int, bytes, str]  # state, output, reason


def run(kind: int, body: bytes, walltime_s: float, functions: FunctionCache, cwd: str | None = None,
        streams: dict[str, str] | None = None) -> Outcome:
    """Run a task body (in cwd, a staged task's work dir); never raises for what the task does.

    streams: {"stdout" or "stderr": path} of a command's streams to write to files, uncapped.
    """
    try:
        if kind == TaskKind.COMMAND:
            return run_command(tasks.decode_command(body), walltime_s, cwd, streams)
        if streams:
            return FAILED, b"", "only command tasks can send stdout or stderr to a file"
        if kind == TaskKind.PYTHON:
            if cwd is None:
                return run_python(body, functions)
            home = os.getcwd()
            os.chdir(cwd)
            try:
                return run_python(body, functions)
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
    try:
        proc = _start(spec, workdir, files)
    except FileNotFoundError as exc:  # as /bin/sh would say it, with its exit status
        msg = f"{exc.filename}: {exc.strerror}"
        return FAILED, tasks.encode_command_output(127, b"", msg.encode(), False), "exit code 127"
    except OSError as exc:
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
        code = proc.wait()
    finally:
        _running = None
    output = tasks.encode_command_output(code, out, err, truncated)
    if timed_out:
        return FAILED, output, f"wall time of {walltime_s:g}s exceeded; the command was killed"
    if code != 0:
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return FAILED, output, why
    return DONE, output, ""


def _start(spec: tasks.CommandSpec, workdir: str | None, files: dict[str, Any]) -> subprocess.Popen:
    """Start the command in its own session; streams not in files are piped back to us."""
    env = None if spec.env is None else {**os.environ, **spec.env}
    cmd: Any = spec.cmd
    shell = isinstance(cmd, str)
    if shell and (argv := direct_argv(cmd.strip())) is not None:
        cmd, shell = list(argv), False
    return subprocess.Popen(
        cmd, shell=shell, env=env, cwd=os.path.join(workdir, spec.cwd or "") if workdir else spec.cwd,
        stdin=subprocess.PIPE if spec.stdin else subprocess.DEVNULL,
        stdout=files.get("stdout", subprocess.PIPE), stderr=files.get("stderr", subprocess.PIPE),
        start_new_session=True,
    )


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
    most cap bytes of each; truncated when either had more."""
    pipes = [f for f in (proc.stdout, proc.stderr) if f is not None]
    keep = {f: bytearray() for f in pipes}
    truncated = timed_out = False
    with selectors.DefaultSelector() as sel:
        for f in pipes:
            sel.register(f, selectors.EVENT_READ)
        pending = memoryview(stdin or b"")
        if stdin:
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        while sel.get_map():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                timed_out = True
                spawn.signal_group(proc.pid, signal.SIGKILL)
                deadline = None  # keep reading what is left, the group is dead
                continue
            for key, _ in sel.select(wait):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        n = os.write(f.fileno(), pending[:_READ_CHUNK])
                        pending = pending[n:]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(f)
                        f.close()
                    continue
                data = os.read(f.fileno(), _READ_CHUNK)
                if not data:
                    sel.unregister(f)
                    f.close()
                    continue
                buf = keep[f]
                room = cap - len(buf)
                if len(data) > room:
                    truncated = True
                buf += data[:max(room, 0)]
    return bytes(keep.get(proc.stdout, b"")), bytes(keep.get(proc.stderr, b"")), truncated, timed_out


_running: subprocess.Popen | None = None  # the command this slot process is running now


def kill_running_command() -> None:
    """Kill the running command's process group (the slot is being stopped)."""
    if _running is not None:
        spawn.signal_group(_running.pid, signal.SIGKILL)


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


def run_python(body: bytes, functions: FunctionCache) -> Outcome:
    """Call a pickled function; its exception, with traceback, is a FAILED outcome."""
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
    try:
        return DONE, tasks.encode_python_value(value), ""
    except Exception as exc:
        msg = f"the return value could not be pickled: {type(exc).__name__}: {exc}"
        return FAILED, tasks.encode_python_error(TypeError(msg), traceback.format_exc()), msg
