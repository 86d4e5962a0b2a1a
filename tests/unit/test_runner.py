"""Running single tasks in this process, as a slot does (no sockets)."""

from __future__ import annotations

import os
import shlex
import signal
import string
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from falconet import tasks
from falconet.errors import RemoteTraceback
from falconet.executor import runner
from falconet.protocol import TaskKind, TaskState

DONE, FAILED = int(TaskState.DONE), int(TaskState.FAILED)


def run_cmd(cmd, walltime_s=0.0, **kw):
    state, output, reason = runner.run(TaskKind.COMMAND, tasks.encode_command(cmd, **kw), walltime_s,
                                       runner.FunctionCache())
    code, out, err, truncated = tasks.decode_command_output(output)
    return state, code, out, err, truncated, reason


def test_a_command_with_stdin_env_and_cwd(tmp_path):
    state, code, out, err, _, reason = run_cmd("cat; echo $GREETING; pwd; echo e >&2", stdin="in\n",
                                               env={"GREETING": "hello"}, cwd=str(tmp_path))
    assert (state, code, reason) == (DONE, 0, "")
    assert out == f"in\nhello\n{tmp_path}\n" and err == "e\n"


def test_exit_codes_and_signals_are_failures_with_reasons():
    assert run_cmd("exit 7")[1::4] == (7, "exit code 7")
    state, code, *_, reason = run_cmd(["sh", "-c", "kill -9 $$"])
    assert (state, code, reason) == (FAILED, -9, "killed by signal 9")


def test_a_missing_program_reads_like_the_shell():
    for cmd in ("no-such-program-xyz --flag", ["no-such-program-xyz"]):
        state, code, _, err, _, reason = run_cmd(cmd)
        assert (state, code, reason) == (FAILED, 127, "exit code 127")
        assert "no-such-program-xyz" in err


def test_output_is_capped_and_marked_truncated():
    state, code, out, _, truncated, _ = run_cmd("head -c 100000 /dev/zero", output_cap=1000)
    assert (state, code, len(out), truncated) == (DONE, 0, 1000, True)


@pytest.mark.parametrize(("cmd", "expected"), [
    ("head -c 1001 /dev/zero >&2", (0, 1000, True)),
    ("head -c 1000 /dev/zero; head -c 1000 /dev/zero >&2", (1000, 1000, False)),  # exactly the cap: whole
])
def test_truncated_says_whether_either_stream_was_cut(cmd, expected):
    _, _, out, err, truncated, _ = run_cmd(cmd, output_cap=1000)
    assert (len(out), len(err), truncated) == expected


def test_streams_sent_to_files_are_whole_and_the_rest_is_still_captured(tmp_path):
    spec = tasks.decode_command(tasks.encode_command("head -c 3000000 /dev/zero; echo e >&2", output_cap=10))
    state, output, reason = runner.run_command(spec, 0.0, None, {"stdout": str(tmp_path / "out")})
    assert (state, reason) == (DONE, "")
    assert tasks.decode_command_output(output) == (0, "", "e\n", False)
    assert (tmp_path / "out").read_bytes() == bytes(3_000_000)


def test_a_stream_file_that_cannot_be_opened_fails_the_task(tmp_path):
    spec = tasks.decode_command(tasks.encode_command("true"))
    state, _, reason = runner.run_command(spec, 0.0, None, {"stdout": str(tmp_path / "no/such/dir/out")})
    assert state == FAILED and reason.startswith("could not open a file for the command's output")


def test_only_commands_send_streams_to_files(tmp_path):
    body = tasks.encode_python(tasks.pickle_function(abs), tasks.pickle_arguments((-1,), {}))
    state, _, reason = runner.run(TaskKind.PYTHON, body, 0.0, runner.FunctionCache(),
                                  streams={"stdout": str(tmp_path / "out")})
    assert state == FAILED and "only command tasks" in reason


def test_wall_time_kills_the_whole_process_group():
    state, code, out, _, _, reason = run_cmd("echo started; sleep 30 & sleep 30; echo never", walltime_s=0.3)
    assert state == FAILED and "wall time of 0.3s exceeded" in reason
    assert out == "started\n" and code == -9


def test_undecodable_bodies_and_unknown_kinds_fail_clearly():
    cache = runner.FunctionCache()
    state, _, reason = runner.run(TaskKind.COMMAND, b"\xc1garbage", 0.0, cache)
    assert state == FAILED and reason.startswith("task body could not be decoded")
    state, _, reason = runner.run(TaskKind.PYTHON, b"\x93\x01\x02\x03", 0.0, cache)
    assert state == FAILED and reason.startswith("task body could not be decoded")
    state, _, reason = runner.run(42, b"", 0.0, cache)
    assert state == FAILED and "unknown task kind 42" in reason


def _py(fn, *args):
    body = tasks.encode_python(tasks.pickle_function(fn), tasks.pickle_arguments(args, {}))
    return runner.run(TaskKind.PYTHON, body, 0.0, runner.FunctionCache())


def test_python_values_exceptions_and_unpicklable_results():
    state, output, _ = _py(lambda a, b: a ** b, 2, 10)
    assert state == DONE and tasks.decode_python_output(output) == 1024

    def fail():
        raise KeyError("missing")

    state, output, reason = _py(fail)
    assert state == FAILED and reason == "KeyError: 'missing'"
    with pytest.raises(KeyError) as info:
        tasks.decode_python_output(output)
    assert isinstance(info.value.__cause__, RemoteTraceback) and "fail" in info.value.__cause__.tb

    state, output, reason = _py(lambda: (x for x in ()))  # a generator cannot be pickled
    assert state == FAILED and "could not be pickled" in reason

    state, _, reason = _py(sys.exit, 3)
    assert state == FAILED and reason.startswith("SystemExit")


def test_a_function_the_executor_cannot_import_fails_before_it_runs(monkeypatch):
    import pickle
    import types

    module = types.ModuleType("only_on_the_client")
    exec("def f():\n    return 1\n", module.__dict__)
    monkeypatch.setitem(sys.modules, "only_on_the_client", module)
    fn_data = pickle.dumps(module.f)  # by reference, as for an installed module
    monkeypatch.delitem(sys.modules, "only_on_the_client")
    body = tasks.encode_python(fn_data, tasks.pickle_arguments((), {}))
    state, _, reason = runner.run(TaskKind.PYTHON, body, 0.0, runner.FunctionCache())
    assert state == FAILED and "could not load the task's function" in reason
    assert "only_on_the_client" in reason


WORD = st.text(alphabet=string.ascii_letters + string.digits + "-_./,:+@", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(WORD, min_size=1, max_size=5))
def test_direct_exec_prints_what_the_shell_would(words):
    line = "/bin/echo " + " ".join(words)
    assert runner.direct_argv(line) == ("/bin/echo", *words)
    via_shell = run_cmd(["/bin/sh", "-c", line])[2]
    assert run_cmd(line)[2] == via_shell == " ".join(words) + "\n"


@pytest.mark.parametrize("line", [
    "echo hi", "cd /tmp", "a=1 b", "ls *", "cat <f", "x | y", "x && y", "$HOME/bin/x", "~/x",
    "x 'q'", 'x "q"', "x\\ y", "x  y", " x", "x # c", "{a,b}", "x;y", "x >f",
])
def test_lines_that_need_the_shell_take_it(line):
    assert runner.direct_argv(line) is None


def test_function_cache_loads_each_function_once():
    cache = runner.FunctionCache(size=2)
    data = [tasks.pickle_function(f) for f in (abs, len, str)]
    assert cache.load(data[0]) is abs and cache.load(data[0]) is abs
    cache.load(data[1])
    cache.load(data[2])  # evicts abs
    assert list(cache._fns) == [data[1], data[2]]


# ---------------------------------------------------------------- the spawn path

_SHOW = ("import os, sys; print(os.getsid(0), sorted(map(int, os.listdir('/proc/self/fd')))[:3],"
         " sys.stdin.read() == '', os.environ.get('FALCONET_T', '-'))")


@pytest.mark.parametrize("via", ["argv", "shell line"])
def test_a_spawned_command_sees_what_popen_would_give_it(via, monkeypatch):
    """Its own session, only stdin/stdout/stderr, SIGPIPE at its default, an empty stdin
    and the slot's environment as it is now."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # as in every Python process
    monkeypatch.setenv("FALCONET_T", "now")
    argv = [sys.executable, "-c", _SHOW]
    cmd = argv if via == "argv" else shlex.join(argv) + ";"
    state, code, out, err, _, reason = run_cmd(cmd)
    assert (state, code, err) == (DONE, 0, ""), reason
    sid, *rest = out.split()
    assert int(sid) != os.getsid(0) and rest == ["[0,", "1,", "2]", "True", "now"]
    assert runner._DEVNULL >= 0, "the spawn path ran"
    # SIGPIPE: Python ignores it in itself, so ask the kernel about a program that does not
    line = run_cmd(["grep", "SigIgn", "/proc/self/status"])[2]
    assert not int(line.split()[1], 16) & (1 << (signal.SIGPIPE - 1)), line


def test_a_path_in_the_tasks_env_takes_popen_and_finds_the_program_there(tmp_path):
    tool = tmp_path / "only-here"
    tool.write_text("#!/bin/sh\necho found\n")
    tool.chmod(0o755)
    state, _, out, _, _, reason = run_cmd(["only-here"], env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert state == DONE and out == "found\n", reason


def test_the_spawn_path_leaves_no_descriptor_open():
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert run_cmd(["/bin/true"])[0] == DONE
        assert run_cmd(["/nonexistent/program"])[0] == FAILED
    assert len(os.listdir("/proc/self/fd")) == before
