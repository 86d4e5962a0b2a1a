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
quoted as in the shell, and a ``# comment`` may end the line.

A line holds at most :data:`MAX_LINE_BYTES` bytes of UTF-8 (Linux's limit on one argument:
``/bin/sh -c LINE`` could not start a longer one); a longer line is an error naming it.
Parsing takes time linear in the file's size.  A directive replaces all of the
requirements and inputs a run gives its lines by default (``falconet run --cpus ... --input
...``); retries, walltime and output-cap it does not set come from the run's options.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass

from falconet import needs as nd
from falconet import tasks
from falconet.errors import TaskFileError

DIRECTIVE = "#falconet"
_OWN_KEYS = ("input", "retries", "walltime", "output-cap")
_NEEDS_KEYS = ("cpus", "memory", "arch", "tag", "tags", "where", "prefer")
_KEYS_TEXT = ", ".join(_NEEDS_KEYS + _OWN_KEYS)
#: The longest line taken, in bytes of UTF-8: Linux's MAX_ARG_STRLEN (32 pages, with the
#: terminating NUL) bounds the one argument of ``/bin/sh -c LINE``.
MAX_LINE_BYTES = 128 * 1024 - 1
_SPECIAL = re.compile(r"[#\\'\"]")  # what ends a plain stretch outside quotes
_IN_DOUBLE = re.compile(r'["\\]')  # what ends a stretch inside double quotes


@dataclass(frozen=True, slots=True)
class Options:
    """What a directive sets for the lines after it (retries, walltime_s, output_cap None: the run's)."""

    needs: nd.Needs = nd.PLAIN
    inputs: tuple[str, ...] = ()
    retries: int | None = None
    walltime_s: float | None = None
    output_cap: int | None = None


@dataclass(frozen=True, slots=True)
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
        if line.startswith("#") and not is_directive(line):
            continue  # a comment, however long
        too_long = _too_long(line)
        if too_long:
            problems.append(f"{source}:{number}: {too_long}")
            continue
        if line.startswith("#"):
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


def _too_long(line: str) -> str:
    """Why a stripped line is too long to run, or ''."""
    # UTF-8 takes at most 4 bytes a character: most lines need no encoding to tell.
    if len(line) <= MAX_LINE_BYTES // 4:
        return ""
    size = len(line.encode("utf-8", "surrogatepass"))
    if size <= MAX_LINE_BYTES:
        return ""
    return (f"a line of {size:,} bytes is longer than the limit of {MAX_LINE_BYTES:,} (the most "
            "/bin/sh -c takes as one command); put the long data in a file and have the command read it")


def _problem(line: str) -> str:
    if "\x00" in line:
        return "contains a NUL byte"
    return quoting_problem(line)


def quoting_problem(line: str) -> str:
    """What shlex.split(line, comments=True) would reject, in one pass: '' if nothing.

    shlex's own loop appends one character at a time to an attribute, which is quadratic in
    the length of a word; this walks from one quote, backslash or '#' to the next.  As in
    shlex, a '#' outside quotes and not escaped starts a comment, even within a word.
    """
    i, n = 0, len(line)
    while True:
        found = _SPECIAL.search(line, i)
        if found is None:
            return ""
        i = found.start()
        c = line[i]
        if c == "#":
            return ""
        if c == "\\":
            if i + 1 == n:
                return _QUOTING.format("no escaped character")
            i += 2
        elif c == "'":  # no escapes inside single quotes
            i = line.find("'", i + 1)
            if i < 0:
                return _QUOTING.format("no closing quotation")
            i += 1
        else:
            i = _double_quoted_end(line, i + 1)
            if i < 0:
                return _QUOTING.format("no escaped character" if i == -2 else "no closing quotation")


_QUOTING = "{}: fix the quoting of this command"


def _double_quoted_end(line: str, i: int) -> int:
    """Where a double-quoted stretch that starts at i ends (past its quote); -1 if it does
    not, -2 if the line ends in the middle of an escape."""
    n = len(line)
    while True:
        found = _IN_DOUBLE.search(line, i)
        if found is None:
            return -1
        i = found.start()
        if line[i] == '"':
            return i + 1
        if i + 1 == n:
            return -2
        i += 2


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
