"""Task bodies and outputs for each TaskKind: what clients encode and executors decode.

The dispatcher never looks inside these bytes.

* command body: msgpack map ``{"cmd": str | [str], "env": {str: str} | nil,
  "cwd": str | nil, "stdin": bytes | nil, "cap": int}``; a string runs through
  ``/bin/sh -c``, a list is an argv.  ``cap`` bounds captured stdout and stderr each.
* command output: msgpack ``[exit_code, stdout, stderr, truncated]``; truncated is true when
  stdout or stderr had more than ``cap`` bytes (the rest was dropped); a process killed by
  signal N has exit code -N, as in :mod:`subprocess`.
* python body: msgpack ``[function, arguments]``, each a pickle; the function is
  cloudpickled once per function so executors can cache it, the arguments are
  ``(args, kwargs)``.
* python output: a pickle of ``("ok", value)`` or ``("err", exception | None, traceback)``.
"""

from __future__ import annotations

import io
import operator
import os
import pickle
import re
import sys
import sysconfig
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import msgpack

from falconet.errors import ProtocolError, RemoteTraceback

DEFAULT_OUTPUT_CAP = 1 << 20  # bytes of stdout and of stderr kept per command

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmg])(?:i?b)?|b)?")

_PLAIN = (int, float, str, bytes, bool, type(None))


def parse_bytes(text: str) -> int:
    """A size in bytes from '4000000', '64k', '10M', '1.5G' or '10MiB' (K, M, G: powers of 1024).

    Raises ValueError saying what is accepted.
    """
    found = _SIZE.fullmatch(text.strip().lower())
    if not found:
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with K, M or G "
                         "(powers of 1024), e.g. 4000000 or 10M")
    number, unit = found.groups()
    scale = _UNITS[unit or ""]
    return int(float(number) * scale) if "." in number else int(number) * scale


def format_bytes(n: int) -> str:
    """'1 MiB', '3.8 MiB', '64 KiB' or '100 bytes'."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            whole = n % (1 << shift) == 0
            return f"{n >> shift} {unit}" if whole else f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def encode_command(
    cmd: str | Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes | str | None = None,
    output_cap: int = DEFAULT_OUTPUT_CAP,
) -> bytes:
    """Encode a command task body."""
    if isinstance(cmd, str):
        if not cmd.strip():
            raise ValueError("a command task needs a non-empty command line")
    else:
        cmd = [str(a) for a in cmd]
        if not cmd:
            raise ValueError("a command task needs a non-empty argv")
    if isinstance(stdin, str):
        stdin = stdin.encode()
    return msgpack.packb(
        {"cmd": cmd, "env": env, "cwd": cwd, "stdin": stdin, "cap": int(output_cap)},
        use_bin_type=True,
    )


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """A decoded command body."""

    cmd: str | list
    env: dict | None
    cwd: str | None
    stdin: bytes | None
    cap: int


def decode_command(body: bytes) -> CommandSpec:
    """Decode a command body or raise ProtocolError naming the bad field."""
    try:
        d = msgpack.unpackb(body, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"command body is not msgpack ({type(exc).__name__})") from None
    if type(d) is not dict:
        raise ProtocolError("command body must be a map")
    cmd = d.get("cmd")
    if not ((isinstance(cmd, str) and cmd.strip())
            or (isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd))):
        raise ProtocolError("command body: 'cmd' must be a non-empty string or list of strings")
    env = d.get("env")
    if env is not None and not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ProtocolError("command body: 'env' must map strings to strings")
    cwd = d.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ProtocolError("command body: 'cwd' must be a string")
    stdin = d.get("stdin")
    if stdin is not None and not isinstance(stdin, bytes):
        raise ProtocolError("command body: 'stdin' must be bytes")
    cap = d.get("cap", DEFAULT_OUTPUT_CAP)
    if type(cap) is not int or cap < 0:
        raise ProtocolError("command body: 'cap' must be a non-negative integer")
    return CommandSpec(cmd, env, cwd, stdin, cap)


def encode_command_output(exit_code: int, stdout: bytes, stderr: bytes, truncated: bool) -> bytes:
    """Encode what a command produced."""
    return msgpack.packb([exit_code, stdout, stderr, truncated], use_bin_type=True)


@dataclass(frozen=True)
class CommandResult:
    """What a command task produced; the value of a command future."""

    exit_code: int
    stdout: str  #: "" when stdout went to a file (submit_command(stdout=...))
    stderr: str  #: "" when stderr went to a file (submit_command(stderr=...))
    #: stdout or stderr had more than the task's output_cap bytes (1 MiB each by default)
    #: and was cut there; raise output_cap, or send the stream to a file to keep it whole
    truncated: bool = False
    executor: str = ""
    attempts: int = 0
    timings: dict = field(default_factory=dict)
    reason: str = ""  #: why it failed, e.g. "exit code 2" or "wall time of 5s exceeded"
    outputs: dict = field(default_factory=dict)  #: staged output name -> client path or s3:// URL

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0 and nothing else failed it (an output
        that was not produced, say: then reason says why)."""
        return self.exit_code == 0 and not self.reason


def decode_command_output(output: bytes) -> tuple[int, str, str, bool]:
    """Decode a command output into (exit_code, stdout, stderr, truncated)."""
    try:
        code, out, err, truncated = msgpack.unpackb(output)
    except Exception as exc:
        raise ProtocolError(f"malformed command output ({type(exc).__name__})") from None
    if type(code) is not int or type(out) is not bytes or type(err) is not bytes:
        raise ProtocolError("malformed command output: expected [int, bytes, bytes, bool]")
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), bool(truncated)


# ---------------------------------------------------------------- python tasks


_INSTALLED = tuple(
    os.path.realpath(path) + os.sep
    for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (path := sysconfig.get_paths().get(key))
)
_by_value_checked: set[str] = set()


def _ship_module_by_value(fn: Any) -> None:
    """Send the code of fn's module along when that module is the user's own.

    cloudpickle pickles a function from an importable module by reference, which fails on
    an executor that lacks the module: a script's helper module, a test file, a notebook's
    sibling .py.  Modules outside the installed prefixes are registered to go by value.
    """
    name = getattr(fn, "__module__", None)
    if not name or name in _by_value_checked:
        return
    _by_value_checked.add(name)
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if module is None or path is None or name == "__main__" or name.split(".")[0] == "falconet":
        return
    if not os.path.realpath(path).startswith(_INSTALLED):
        cloudpickle.register_pickle_by_value(module)


def pickle_function(fn: Any) -> bytes:
    """Serialise a callable; by value where the executor may not have its code.

    A plain function is pickled once and its bytes reused while nothing it carries is
    rebound (see :class:`_FunctionPickles`): cloudpickle costs tens of microseconds a call,
    most of a one-task submit().
    """
    if type(fn) is types.FunctionType:
        return _FUNCTIONS.dumps(fn)
    _ship_module_by_value(fn)
    return cloudpickle.dumps(fn)


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name code and the code nested in it may look up (globals among them)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


class _FunctionPickles:
    """The pickles of recently submitted functions, each with what it was made from.

    A function pickled by value carries its code, defaults, closure cells, attributes and
    the globals its code names, and so does every function it reaches through those (a
    helper it calls), as they were when it was pickled.  The pickle is reused only while
    each of those is the same object (identity): rebinding a global, a default or a cell,
    of the function or of a helper, pickles it again.  What it cannot see is an object
    changed in place (a global list appended to after the first submit); such data
    belongs in the arguments.
    """

    def __init__(self, size: int = 256):
        self.size = size
        self._made: dict[types.FunctionType, tuple[list, bytes]] = {}
        self._names: dict[types.CodeType, tuple[str, ...]] = {}
        self._lock = threading.Lock()  # submit() from many threads

    def _carried(self, fn: types.FunctionType) -> list:
        """What fn's pickle depends on, flat: of fn, then of each function it reaches."""
        out: list = []
        seen, todo = {id(fn)}, [fn]
        names_of = self._names
        while todo:
            f = todo.pop()
            code, attrs = f.__code__, f.__dict__
            names = names_of.get(code)
            if names is None:
                names = names_of[code] = _global_names(code)
            values = list(map(f.__globals__.get, names))
            cells = [c.cell_contents for c in f.__closure__] if f.__closure__ else []
            out += (code, f.__defaults__, f.__kwdefaults__, f.__qualname__, f.__module__, *attrs, *attrs.values())
            out += values
            out += cells
            for v in (*values, *cells):
                if type(v) is types.FunctionType and id(v) not in seen:
                    seen.add(id(v))
                    todo.append(v)
        return out

    def dumps(self, fn: types.FunctionType) -> bytes:
        made = self._made.get(fn)
        try:
            carried = self._carried(fn)
        except ValueError:  # an empty closure cell: pickle it each time
            return cloudpickle.dumps(fn)
        if made is not None and len(made[0]) == len(carried) and all(map(operator.is_, made[0], carried)):
            return made[1]
        _ship_module_by_value(fn)
        data = cloudpickle.dumps(fn)
        with self._lock:
            if len(self._made) >= self.size:
                self._made.clear()
                self._names.clear()
            self._made[fn] = (carried, data)
        return data


_FUNCTIONS = _FunctionPickles()


_PLAIN_TYPES = frozenset(_PLAIN)


def _plain(obj: Any, depth: int = 0) -> bool:
    """True when the standard pickler can carry obj without cloudpickle's help."""
    if type(obj) in _PLAIN_TYPES:
        return True
    # Exact types only: a namedtuple or subclass may live where the executor cannot import it.
    if depth < 3 and type(obj) in (tuple, list):
        # most often every item is plain: one pass in C, then the careful way
        return _PLAIN_TYPES.issuperset(map(type, obj)) or all(_plain(x, depth + 1) for x in obj)
    if depth < 3 and type(obj) is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in obj.items())
    return False


class _ArgumentPickler(cloudpickle.Pickler):
    """cloudpickle, shipping by value the user's own modules of the functions and classes
    found inside the arguments too (a workflow engine such as Dask passes the user's
    functions as arguments of its own)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)):
            _ship_module_by_value(obj)
        return super().reducer_override(obj)


def pickle_arguments(args: tuple, kwargs: dict) -> bytes:
    """Serialise call arguments; plain data takes the fast C pickler."""
    payload = (args, kwargs)
    if _plain(args) and (not kwargs or _plain(kwargs)):
        return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return _cloudpickle_arguments(payload)


def _cloudpickle_arguments(payload: Any) -> bytes:
    buffer = io.BytesIO()
    _ArgumentPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)
    return buffer.getvalue()


def encode_python(fn_pickle: bytes, args_pickle: bytes) -> bytes:
    """Encode a python task body from its pickled function and arguments: the msgpack
    array of two bins, written out here (msgpack.packb makes a Packer per call, which is
    most of its cost on a one-task submit)."""
    return b"".join((b"\x92", _bin_header(len(fn_pickle)), fn_pickle, _bin_header(len(args_pickle)), args_pickle))


def _bin_header(n: int) -> bytes:
    """msgpack's bin 8, 16 or 32 header for n bytes."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def decode_python(body: bytes) -> tuple[bytes, bytes]:
    """Split a python body into (function pickle, arguments pickle)."""
    try:
        fn, args = msgpack.unpackb(body)
    except Exception as exc:
        raise ProtocolError(f"python body is not [function, arguments] ({type(exc).__name__})") from None
    if type(fn) is not bytes or type(args) is not bytes:
        raise ProtocolError("python body: function and arguments must be bytes")
    return fn, args


def encode_python_value(value: Any) -> bytes:
    """Pickle a task's return value; raises if it cannot be pickled."""
    if _plain(value):
        return pickle.dumps(("ok", value), protocol=pickle.HIGHEST_PROTOCOL)
    return cloudpickle.dumps(("ok", value))


def encode_python_error(exc: BaseException, tb: str) -> bytes:
    """Pickle a task's exception, falling back to its text when it will not pickle."""
    try:
        data = cloudpickle.dumps(("err", exc, tb))
        pickle.loads(data)  # an exception that pickles but cannot load would break the client
        return data
    except Exception:
        return cloudpickle.dumps(("err", None, tb))


def decode_python_output(output: bytes) -> Any:
    """Return the task's value or raise its exception with the remote traceback."""
    try:
        data = pickle.loads(output)
    except Exception as exc:
        raise ProtocolError(f"could not unpickle the task's result: {exc}") from exc
    if type(data) is tuple and len(data) == 2 and data[0] == "ok":
        return data[1]
    if not (type(data) is tuple and len(data) == 3 and data[0] == "err" and isinstance(data[2], str)
            and (data[1] is None or isinstance(data[1], BaseException))):
        raise ProtocolError("malformed python task output: expected ('ok', value) or ('err', exc, tb)")
    _, exc, tb = data
    if exc is None:
        exc = RuntimeError("the task raised an exception that could not be pickled")
    exc.__cause__ = RemoteTraceback(tb)
    raise exc
