"""Task files: one shell command per line; blank lines and lines starting with # are skipped."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from falconet.errors import TaskFileError


@dataclass(frozen=True)
class TaskLine:
    """One command and the line it came from."""

    line: int
    command: str


def parse(text: str, source: str = "<tasks>") -> list[TaskLine]:
    """Return the commands, or raise TaskFileError listing every bad line with its number."""
    found, problems = [], []
    # Only \n ends a line, as for the shell; str.splitlines() would also split at \f, \x1c...
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        problem = _problem(line)
        if problem:
            problems.append(f"{source}:{number}: {problem}")
        else:
            found.append(TaskLine(number, line))
    if problems:
        shown = problems[:10]
        if len(problems) > 10:
            shown.append(f"... and {len(problems) - 10} more bad lines")
        raise TaskFileError("\n".join(shown))
    return found


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
