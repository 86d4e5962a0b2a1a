"""Task files: one shell command per line, with directives that set options for the lines after them.

Blank lines and lines starting with ``#`` are skipped, except directives::

    #falconet cpus=4 memory=8000 tag=gpu input=ref.fa input=s3://bucket/index retries=1 walltime=60 output-cap=10M
    align sample1.fq
    align sample2.fq
    #falconet reset
    echo plain again

A directive sets the options of every following line up to the next directive; ``#falconet
reset`` (or a bare ``#falconet``) returns to no directive.  Keys: those of
:func:`falconet.needs.parse_assignments` (cpus, memory in MB, arch, tag (repeatable), tags
(comma list), where, prefer), ``input=PATH_OR_S3_URL`` (repeatable: a file put in each task's
work dir under its base name), ``retries=N``, ``walltime=S`` (0: no limit) and
``output-cap=SIZE`` (bytes of stdout and of stderr kept, e.g. 4000000 or 10M).  Values may be
quoted as in the shell, and a ``# comment`` may end the line.  A directive replaces all of the
requirements and inputs a run gives its lines by default (``falconet run --cpus ... --input
...``); retries, walltime and output-cap it does not set come from the run's options.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from falconet import needs as nd
from falconet import tasks
from falconet.errors import TaskFileError

DIRECTIVE = "#falconet"
_OWN_KEYS = ("input", "retries", "walltime", "output-cap")
_NEEDS_KEYS = ("cpus", "memory", "arch", "tag", "tags", "where", "prefer")
_KEYS_TEXT = ", ".join(_NEEDS_KEYS + _OWN_KEYS)


@dataclass(frozen=True, slots=True)
class Options:
    """What a directive sets for the lines after it (retries, walltime_s, output_cap None: the run's)."""

    needs: nd.Needs = nd.PLAIN
    inputs: tuple[str, ...] = ()
    retries: int | None = None
    walltime_s: float | None = None
    output_cap: int | None = None


@dataclass(frozen=True)
class TaskLine:
    """One command, the line it came from, and its directive's options (None: no directive)."""

    line: int
    command: str
    options: Options | None = None


def parse(text: str, source: str = "<tasks>") -> list[TaskLine]:
    """Return the commands, or raise TaskFileError listing every bad line with its number."""
    found, problems = [], []
    options: Options | None = None
    # Only \n ends a line, as for the shell; str.splitlines() would also split at \f, \x1c...
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if not is_directive(line):
                continue
            try:
                options = directive(line)
            except ValueError as exc:
                problems.append(f"{source}:{number}: {exc}")
            continue
        problem = _problem(line)
        if problem:
            problems.append(f"{source}:{number}: {problem}")
        else:
            found.append(TaskLine(number, line, options))
    if problems:
        shown = problems[:10]
        if len(problems) > 10:
            shown.append(f"... and {len(problems) - 10} more bad lines")
        raise TaskFileError("\n".join(shown))
    return found


def is_directive(line: str) -> bool:
    """True for '#falconet' alone or followed by white space (not '#falconets', '# falconet')."""
    return line.startswith(DIRECTIVE) and (len(line) == len(DIRECTIVE) or line[len(DIRECTIVE)].isspace())


def directive(line: str) -> Options | None:
    """The options a stripped directive line sets (None for reset); ValueError says what is wrong."""
    try:
        words = shlex.split(line[len(DIRECTIVE):], comments=True)
    except ValueError as exc:
        raise ValueError(f"directive: {str(exc).lower()}: fix its quoting") from None
    if not words or words == ["reset"]:
        return None
    if "reset" in words:
        raise ValueError("directive: 'reset' stands alone; put the new options on a directive of their own")
    needs_words, inputs, own = [], [], {}
    for word in words:
        key, eq, value = word.partition("=")
        if key in _NEEDS_KEYS:
            needs_words.append(word)
        elif key not in _OWN_KEYS:
            raise ValueError(f"directive: unknown key {key!r} in {word!r}; keys are {_KEYS_TEXT}, or 'reset'")
        elif not eq or not value:
            raise ValueError(f"directive: {word!r} is not {key}=VALUE")
        elif key == "input":
            inputs.append(value)
        elif key == "retries":
            own["retries"] = _whole(key, value)
        elif key == "walltime":
            own["walltime_s"] = _seconds(key, value)
        else:
            own["output_cap"] = _size(key, value)
    try:
        requirements = nd.parse_assignments(needs_words)
    except ValueError as exc:
        raise ValueError(f"directive: {exc}") from None
    return Options(requirements, tuple(inputs), **own)


def _whole(key: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"directive: {key} must be a whole number, 0 or more, not {value!r}")
    return n


def _seconds(key: str, value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        s = -1.0
    if not (s >= 0 and math.isfinite(s)):
        raise ValueError(f"directive: {key} must be seconds, 0 or more (0: no limit), not {value!r}")
    return s


def _size(key: str, value: str) -> int:
    try:
        return tasks.parse_bytes(value)
    except ValueError as exc:
        raise ValueError(f"directive: {key}: {exc}") from None


def _problem(line: str) -> str:
    if "\x00" in line:
        return "contains a NUL byte"
    try:
        shlex.split(line, comments=True)
    except ValueError as exc:  # unbalanced quotes or a trailing escape
        return f"{str(exc).lower()}: fix the quoting of this command"
    return ""


def read(path: str) -> list[TaskLine]:
    """Read and parse a task file; unreadable or non-UTF-8 files raise TaskFileError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise TaskFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TaskFileError(f"{path}: {exc.strerror}") from None
    return parse(text, path)
