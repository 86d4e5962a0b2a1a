"""Task body and output codecs: commands, python functions, their results and errors."""

from __future__ import annotations

import collections
import contextlib
import copyreg
import pickle
import sys
import threading

import cloudpickle
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import tasks
from falconet.errors import ProtocolError, RemoteTraceback

# ---------------------------------------------------------------- command bodies


@pytest.mark.parametrize(
    ("cmd", "kwargs", "expected"),
    [
        ("echo hi", {}, tasks.CommandSpec("echo hi", None, None, None, tasks.DEFAULT_OUTPUT_CAP)),
        (["ls", "-l", "a b"], {}, tasks.CommandSpec(["ls", "-l", "a b"], None, None, None, tasks.DEFAULT_OUTPUT_CAP)),
        (("sleep", 1), {}, tasks.CommandSpec(["sleep", "1"], None, None, None, tasks.DEFAULT_OUTPUT_CAP)),
        (
            "env",
            {"env": {"A": "1", "PATH": "/bin"}, "cwd": "/tmp/work"},
            tasks.CommandSpec("env", {"A": "1", "PATH": "/bin"}, "/tmp/work", None, tasks.DEFAULT_OUTPUT_CAP),
        ),
        ("cat", {"stdin": "héllo\n"}, tasks.CommandSpec("cat", None, None, "héllo\n".encode(), tasks.DEFAULT_OUTPUT_CAP)),
        ("cat", {"stdin": b"\x00\xff"}, tasks.CommandSpec("cat", None, None, b"\x00\xff", tasks.DEFAULT_OUTPUT_CAP)),
        ("yes", {"output_cap": 10}, tasks.CommandSpec("yes", None, None, None, 10)),
        ("true", {"output_cap": 0}, tasks.CommandSpec("true", None, None, None, 0)),
    ],
    ids=["str", "argv", "argv-coerced", "env-cwd", "stdin-str", "stdin-bytes", "cap", "cap-zero"],
)
def test_command_round_trip(cmd, kwargs, expected):
    assert tasks.decode_command(tasks.encode_command(cmd, **kwargs)) == expected


@pytest.mark.parametrize("cmd", ["", "   ", "\t\n", [], ()], ids=["empty", "spaces", "whitespace", "argv", "tuple"])
def test_empty_command_is_rejected(cmd):
    with pytest.raises(ValueError, match="non-empty"):
        tasks.encode_command(cmd)


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\x85\xa3cmd", msgpack.packb(["echo"]), msgpack.packb("echo"), msgpack.packb(None)],
    ids=["empty", "reserved-byte", "truncated-map", "array", "string", "nil"],
)
def test_decode_command_refuses_garbage(body):
    with pytest.raises(ProtocolError, match="command body"):
        tasks.decode_command(body)


def _body(**fields) -> bytes:
    d = {"cmd": "echo", "env": None, "cwd": None, "stdin": None, "cap": 100}
    d.update(fields)
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cmd", None),
        ("cmd", 5),
        ("cmd", b"echo"),
        ("cmd", []),
        ("cmd", ["ls", 1]),
        ("cmd", {"a": "b"}),
        ("env", "A=1"),
        ("env", ["A", "1"]),
        ("env", {"A": 1}),
        ("env", {"A": b"1"}),
        ("cwd", 5),
        ("cwd", b"/tmp"),
        ("stdin", "text"),
        ("stdin", 5),
        ("cap", -1),
        ("cap", True),
        ("cap", 1.5),
        ("cap", "10"),
        ("cap", None),
    ],
)
def test_decode_command_names_the_bad_field(field, value):
    with pytest.raises(ProtocolError, match=f"'{field}'"):
        tasks.decode_command(_body(**{field: value}))


def test_decode_command_without_cmd_names_cmd():
    with pytest.raises(ProtocolError, match="'cmd'"):
        tasks.decode_command(msgpack.packb({"env": None}))


def test_decode_command_defaults_a_missing_cap():
    spec = tasks.decode_command(msgpack.packb({"cmd": "true"}))
    assert spec.cap == tasks.DEFAULT_OUTPUT_CAP and spec.env is None and spec.stdin is None


@pytest.mark.parametrize(("text", "size"), [
    ("4000000", 4_000_000), ("0", 0), ("64k", 64 << 10), ("10M", 10 << 20), ("10MiB", 10 << 20),
    ("10mb", 10 << 20), ("1.5G", 3 << 29), (" 2 M ", 2 << 20), ("100b", 100),
])
def test_sizes_are_bytes_or_powers_of_1024(text, size):
    assert tasks.parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1", "1T", "1e6", "nan", "ten"])
def test_a_bad_size_says_what_is_accepted(text):
    with pytest.raises(ValueError, match="K, M or G"):
        tasks.parse_bytes(text)


def test_sizes_read_back_in_the_largest_unit():
    assert [tasks.format_bytes(n) for n in (1 << 20, 4_000_000, 64 << 10, 100, 3 << 30)] == [
        "1 MiB", "3.8 MiB", "64 KiB", "100 bytes", "3 GiB"]


# ---------------------------------------------------------------- command outputs


def test_command_output_round_trip():
    out = tasks.encode_command_output(-9, b"line\n", b"bad \xff byte", True)
    assert tasks.decode_command_output(out) == (-9, "line\n", "bad \ufffd byte", True)


@pytest.mark.parametrize(
    "output", [b"", b"\xc1", msgpack.packb(5), msgpack.packb([0, b"", b""])], ids=["empty", "garbage", "int", "short"]
)
def test_command_output_garbage_is_refused(output):
    with pytest.raises(ProtocolError, match="command output"):
        tasks.decode_command_output(output)


def test_command_output_of_wrong_types_is_refused():
    with pytest.raises(ProtocolError):
        tasks.decode_command_output(msgpack.packb([0, "text", "text", False]))


# ---------------------------------------------------------------- python bodies


def _make_adder(n):
    def add(x):
        return x + n

    return add


def _load_function(data: bytes):
    return pickle.loads(data)  # what the executor does (executor/runner.py FunctionCache)


def test_python_body_round_trip_with_a_lambda():
    fn_data = tasks.pickle_function(lambda x, y=2: x * y)
    args_data = tasks.pickle_arguments((3,), {"y": 5})
    fn_back, args_back = tasks.decode_python(tasks.encode_python(fn_data, args_data))
    assert (fn_back, args_back) == (fn_data, args_data)
    args, kwargs = pickle.loads(args_back)
    assert _load_function(fn_back)(*args, **kwargs) == 15


def test_python_function_closure_is_carried_by_value():
    fn = _load_function(tasks.pickle_function(_make_adder(40)))
    assert fn(2) == 42


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        msgpack.packb([b"fn"]),
        msgpack.packb([b"fn", b"args", b"extra"]),
        msgpack.packb([b"fn", "args"]),
        msgpack.packb(["fn", b"args"]),
        msgpack.packb({"fn": b"", "args": b""}),
        msgpack.packb(7),
    ],
    ids=["empty", "garbage", "one", "three", "str-args", "str-fn", "map", "int"],
)
def test_decode_python_refuses_garbage(body):
    with pytest.raises(ProtocolError, match="python body"):
        tasks.decode_python(body)


# ---------------------------------------------------------------- python outputs


@pytest.mark.parametrize("value", [None, 0, "text", b"\x00", [1, (2, 3)], {"k": {1.5}}], ids=repr)
def test_python_value_round_trip(value):
    assert tasks.decode_python_output(tasks.encode_python_value(value)) == value


def test_python_value_may_be_a_lambda():
    fn = tasks.decode_python_output(tasks.encode_python_value(lambda: "called"))
    assert fn() == "called"


class TaskFailed(Exception):
    """A module-level exception type, importable on both sides."""


class NeedsTwoArgs(Exception):
    """Pickles fine, but unpickling calls NeedsTwoArgs(a) and fails."""

    def __init__(self, a, b):
        super().__init__(a)
        self.b = b


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize("exc", [ValueError("boom"), TaskFailed("task said no"), KeyError("k")], ids=repr)
def test_python_error_reraises_the_original_type_with_the_remote_traceback(exc):
    tb = "Traceback (most recent call last):\n  File 'remote.py', line 1\nValueError: boom\n"
    output = tasks.encode_python_error(_raised(exc), tb)
    with pytest.raises(type(exc)) as info:
        tasks.decode_python_output(output)
    assert type(info.value) is type(exc) and info.value.args == exc.args
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and cause.tb == tb and str(cause) == tb


def _unpicklable() -> Exception:
    exc = TaskFailed("holds a lock")
    exc.lock = threading.Lock()
    return exc


@pytest.mark.parametrize(
    "exc", [_unpicklable(), NeedsTwoArgs("a", "b")], ids=["will-not-pickle", "will-not-unpickle"]
)
def test_python_error_that_will_not_travel_falls_back_to_its_traceback(exc, monkeypatch):
    # tblib's pickling support (which dask.multiprocessing installs, once imported by an
    # earlier test in this process) would carry these exceptions anyway: not under test here.
    monkeypatch.delitem(copyreg.dispatch_table, type(exc), raising=False)
    output = tasks.encode_python_error(_raised(exc), "the remote traceback")
    with pytest.raises(RuntimeError, match="could not be pickled") as info:
        tasks.decode_python_output(output)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert info.value.__cause__.tb == "the remote traceback"


@pytest.mark.parametrize("output", [b"", b"not a pickle", pickle.dumps(5)], ids=["empty", "garbage", "int"])
def test_python_output_garbage_is_refused(output):
    with pytest.raises(ProtocolError, match="unpickle|malformed python task output"):
        tasks.decode_python_output(output)


# ---------------------------------------------------------------- arguments


@pytest.fixture(autouse=True)
def forget_modules_shipped_by_value():
    """Shipping a module by value is process-wide: undo what a test caused, so this file's
    own module keeps pickling by reference for the tests that rely on it."""
    before = set(tasks._by_value_checked)
    yield
    for name in tasks._by_value_checked - before:
        module = sys.modules.get(name)
        if module is not None:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)
    tasks._by_value_checked.intersection_update(before)


@pytest.fixture
def cloudpickle_calls(monkeypatch):
    """Record every time falconet.tasks falls back to cloudpickle for arguments, still
    pickling for real."""
    calls = []
    real = tasks._cloudpickle_arguments

    def dumps(obj):
        calls.append(obj)
        return real(obj)

    monkeypatch.setattr(tasks, "_cloudpickle_arguments", dumps)
    return calls


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1, 2.5, "s", b"b", None, True), {"k": [1, (2, 3)]}), (([1, {"a": 2}],), {"x": {"y": [None]}})],
    ids=["nothing", "scalars", "nested"],
)
def test_plain_arguments_take_the_fast_path(cloudpickle_calls, args, kwargs):
    data = tasks.pickle_arguments(args, kwargs)
    assert cloudpickle_calls == []
    assert pickle.loads(data) == (args, kwargs)


@pytest.mark.parametrize("where", ["args", "kwargs", "nested"])
def test_arguments_with_a_lambda_fall_back_to_cloudpickle(cloudpickle_calls, where):
    fn = lambda x: x + 1  # noqa: E731 - the point is a lambda
    args, kwargs = {"args": ((fn,), {}), "kwargs": ((), {"f": fn}), "nested": (([{"f": fn}],), {})}[where]
    data = tasks.pickle_arguments(args, kwargs)
    assert len(cloudpickle_calls) == 1
    args_back, kwargs_back = pickle.loads(data)
    loaded = {"args": lambda: args_back[0], "kwargs": lambda: kwargs_back["f"], "nested": lambda: args_back[0][0]["f"]}
    assert loaded[where]()(1) == 2


def test_functions_inside_arguments_go_by_value_when_their_module_is_the_users(tmp_path, monkeypatch):
    """A workflow engine passes the user's functions as arguments of its own: the executor
    may not have the user's module, so its code goes along."""
    (tmp_path / "users_helpers_xyz.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import users_helpers_xyz

    data = tasks.pickle_arguments(([users_helpers_xyz.twice],), {})
    monkeypatch.delitem(sys.modules, "users_helpers_xyz")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    (args, _), = [pickle.loads(data)]
    assert args[0][0](21) == 42


def test_deeply_nested_plain_arguments_load_back():
    deep = [[[[[1, {"k": (2,)}]]]]]
    assert pickle.loads(tasks.pickle_arguments((deep,), {})) == ((deep,), {})


def test_local_subclass_of_a_plain_type_loads_back():
    class Tag(str):
        pass

    args, _ = pickle.loads(tasks.pickle_arguments((Tag("t"),), {}))
    assert args[0] == "t"
    assert tasks.decode_python_output(tasks.encode_python_value(Tag("v"))) == "v"


def _local_namedtuple():
    Point = collections.namedtuple("Point", "x y")  # like one defined in a user's __main__
    return Point(1, 2)


@pytest.mark.parametrize("where", ["arguments", "return-value"])
def test_namedtuple_of_a_local_class_loads_back(where):
    value = _local_namedtuple()
    if where == "arguments":
        (back,), _ = pickle.loads(tasks.pickle_arguments((value,), {}))
    else:
        back = tasks.decode_python_output(tasks.encode_python_value(value))
    assert back == (1, 2) and type(back).__name__ == "Point"


def test_the_futures_executor_keeps_its_old_name_for_a_release():
    import concurrent.futures as cf

    import falconet

    assert falconet.FalconetExecutor is falconet.FuturesExecutor
    assert issubclass(falconet.FuturesExecutor, cf.Executor)


# ---------------------------------------------------------------- a function is pickled once

SCALE = 2


def _scaled(x):
    return x * SCALE


def test_a_function_is_pickled_once_while_nothing_it_carries_changes(monkeypatch):
    calls = []
    real = tasks.cloudpickle.dumps
    monkeypatch.setattr(tasks.cloudpickle, "dumps", lambda obj, *a, **k: calls.append(obj) or real(obj, *a, **k))
    adder = _make_adder(1)
    first = tasks.pickle_function(adder)
    assert tasks.pickle_function(adder) is first and calls == [adder]


def test_rebinding_a_global_default_or_cell_pickles_the_function_again(monkeypatch):
    before = tasks.pickle_function(_scaled)
    assert _load_function(before)(2) == 4
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3)
    after = tasks.pickle_function(_scaled)
    assert after is not before and _load_function(after)(2) == 6

    def outer():
        n = 1

        def inner(x, y=10):
            return x + n + y

        def bump():
            nonlocal n
            n += 1

        return inner, bump

    inner, bump = outer()
    assert _load_function(tasks.pickle_function(inner))(0) == 11
    bump()
    assert _load_function(tasks.pickle_function(inner))(0) == 12
    inner.__defaults__ = (20,)
    assert _load_function(tasks.pickle_function(inner))(0) == 22
    inner.tag = "t"
    assert _load_function(tasks.pickle_function(inner)).tag == "t"


OFFSET = 10


def _offset():
    return OFFSET


def _calls_a_helper(x):
    return x + _offset()


def test_rebinding_a_global_of_a_helper_it_calls_pickles_the_function_again(monkeypatch):
    """cloudpickle carries the helper (and its globals) inside the function's pickle."""
    module = sys.modules[__name__]
    was = module.__name__ in tasks.cloudpickle.list_registry_pickle_by_value()
    tasks.cloudpickle.register_pickle_by_value(module)  # as for a script's own module
    try:
        assert _load_function(tasks.pickle_function(_calls_a_helper))(1) == 11
        monkeypatch.setattr(sys.modules[__name__], "OFFSET", 20)
        assert _load_function(tasks.pickle_function(_calls_a_helper))(1) == 21

        def recursive(n):
            return 0 if n == 0 else recursive(n - 1) + OFFSET

        assert _load_function(tasks.pickle_function(recursive))(2) == 40, "a function that reaches itself"
    finally:
        if not was:
            tasks.cloudpickle.unregister_pickle_by_value(module)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=8))
def test_a_cached_pickle_always_loads_as_the_function_is_now(values):
    """Whatever sequence of rebinds: what loads computes what the function computes now."""
    box = {"k": 0}

    def make():
        k = box["k"]
        return lambda x: x + k

    fn = make()
    cell = fn.__closure__[0]
    for v in values:
        cell.cell_contents = v  # rebinds the cell in place (what nonlocal does)
        assert _load_function(tasks.pickle_function(fn))(100) == fn(100) == 100 + v


def test_a_function_with_an_empty_cell_still_pickles():
    def outer():
        def inner():
            return later

        data = tasks.pickle_function(inner)
        later = 5
        return data, inner

    data, inner = outer()
    assert tasks.pickle_function(inner) is not data and _load_function(tasks.pickle_function(inner))() == 5


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([0, 1, 255, 256, 65535, 65536, 70000]))
def test_a_python_body_is_what_msgpack_would_write(fn, pad):
    args = b"a" * pad
    assert tasks.encode_python(fn, args) == msgpack.packb([fn, args], use_bin_type=True)
    assert tasks.decode_python(tasks.encode_python(fn, args)) == (fn, args)
