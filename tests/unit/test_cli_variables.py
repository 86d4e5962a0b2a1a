"""Environment variables of the command line: one rule, every name works, every documented name exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click
import pytest

from falconet import cli

ROOT = Path(__file__).resolve().parents[2]
#: Variables read by the library rather than by an option.
LIBRARY_VARIABLES = {"FALCONET_S3_ENDPOINT_URL", "FALCONET_FAILPOINTS", "FALCONET_BENCH_PYSPY",
                     "FALCONET_SPEC"}  # the last: the image recipe's pip spec (ami/install.sh)


def _commands(group: click.Group = cli.main, path: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _options(cmd: click.Command):
    return [p for p in cmd.params if isinstance(p, click.Option) and p.name not in ("help", "version")]


def _variables(option: click.Option) -> list[str]:
    return [option.envvar] if isinstance(option.envvar, str) else list(option.envvar)


def test_every_option_is_named_by_the_rule():
    for path, cmd in _commands():
        for option in _options(cmd):
            flag = max(option.opts, key=len)
            own = "FALCONET_" + "_".join(path + (flag[2:],)).upper().replace("-", "_")
            names = _variables(option)
            assert names[0] == own and option.show_envvar, (path, flag, names)
            assert names[1:] in ([], [cli.SHARED_VARIABLES.get(flag)]), (path, flag, names)


def test_client_commands_take_falconet_dispatcher_and_the_executor_does_not():
    takers = {path[-1] for path, cmd in _commands() for o in _options(cmd) if "FALCONET_DISPATCHER" in _variables(o)}
    assert takers == {"run", "submit", "status", "executors", "events", "provisioner"}


def _value_for(option: click.Option, tmp_path: Path) -> tuple[str, object]:
    """A text to put in the option's variable and what the option should then hold."""
    t = option.type
    if option.is_flag:
        return "1", True
    if isinstance(t, click.Choice):
        return t.choices[-1], t.choices[-1]
    if isinstance(t, click.IntRange) or t is click.INT:
        value = (getattr(t, "min", None) or 0) + 3
        return str(value), value
    if isinstance(t, click.FloatRange) or t is click.FLOAT:
        value = (getattr(t, "min", None) or 0) + 3.5
        return str(value), value
    if isinstance(t, cli.NameWeight):
        return "nightly=0.5", None
    if isinstance(t, cli.ByteSize):
        return "3M", 3 << 20
    if isinstance(t, click.Path):
        target = tmp_path / f"{option.name}.toml"
        if t.dir_okay and not t.file_okay:
            target = tmp_path / option.name
            target.mkdir(exist_ok=True)
        else:
            target.write_text("[provisioner]\n")
        return str(target), str(target)
    if isinstance(t, click.File):
        return str(tmp_path / "out.jsonl"), None
    return "tcp://127.0.0.1:7" if "dispatcher" in option.name or "address" in option.name else "word", None


def _context(path: tuple[str, ...], cmd: click.Command, tmp_path: Path) -> click.Context:
    args = {"run": [str(tmp_path / "tasks.txt")], "submit": ["true"], "init": [str(tmp_path / "k")],
            "add": [str(tmp_path), "client", "name"]}.get(path[-1], [])
    return cmd.make_context(path[-1], args)


@pytest.mark.parametrize("path,cmd", list(_commands()), ids=lambda x: "-".join(x) if isinstance(x, tuple) else "")
def test_every_variable_sets_its_option(path, cmd, tmp_path, monkeypatch):
    """Set one option's variables at a time (its own name, then the shared one) and parse."""
    options = _options(cmd)
    for option in options:
        text, expected = _value_for(option, tmp_path)
        for name in _variables(option):
            for other in options:  # required ones by their own name, the rest unset
                for var in _variables(other):
                    _unset(monkeypatch, var)
                if other.required and other is not option:
                    monkeypatch.setenv(_variables(other)[0], _value_for(other, tmp_path)[0])
            monkeypatch.setenv(name, text)
            _check(option, name, text, expected, _context(path, cmd, tmp_path))


def _unset(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    """Unset var now and restore it after the test, even if a callback sets it meanwhile
    (delenv alone records nothing for a variable that is not set)."""
    monkeypatch.setenv(var, "")
    monkeypatch.delenv(var)


def _check(option: click.Option, name: str, text: str, expected: object, ctx: click.Context) -> None:
    flag = max(option.opts, key=len)
    if flag == "--config":  # its table becomes the defaults of the other options
        assert ctx.default_map == {}, name
    elif not option.expose_value:  # the key options hand their value on to falconet.Client
        assert os.environ.get(cli.SHARED_VARIABLES[flag]) == text, name
    else:
        value = ctx.params[option.name]
        if option.multiple:
            value = value[0] if value else None
        if expected is None:
            assert value is not None and value != option.default, (name, value)
        else:
            assert value == expected, (name, value)


def test_every_documented_variable_exists():
    known = {n for _, cmd in _commands() for o in _options(cmd) for n in _variables(o)} | LIBRARY_VARIABLES
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "ami").glob("*"))]
    for doc in documents:
        if doc.is_file():
            for name in re.findall(r"FALCONET_[A-Z0-9_]*[A-Z0-9]\b", doc.read_text(errors="replace")):
                assert name in known, f"{doc.name} documents {name}, which nothing reads"


def test_a_command_line_choice_wins_over_one_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FALCONET_DISPATCHER", "tcp://127.0.0.1:7")
    ctx = cli.run.make_context("run", [str(tmp_path / "t.txt"), "--local", "2"])
    with ctx:
        assert cli._one_place(local_slots=2, dispatcher=ctx.params["dispatcher"], provision=None) == (2, None, None)
    ctx = cli.run.make_context("run", [str(tmp_path / "t.txt"), "--local", "2", "--dispatcher", "tcp://h:1"])
    with ctx, pytest.raises(click.UsageError):
        cli._one_place(local_slots=2, dispatcher="tcp://h:1", provision=None)
