"""Long task lines: the quoting check in one pass, and the line-length limit."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import taskfile
from falconet.errors import TaskFileError


def shlex_problem(line: str) -> str:
    """The check the parser made before: shlex.split, whose error it reports."""
    try:
        shlex.split(line, comments=True)
    except ValueError as exc:
        return f"{str(exc).lower()}: fix the quoting of this command"
    return ""


# The characters that matter to the shell's quoting, and a few that do not.
_quoting_text = st.text(alphabet=st.sampled_from("ab \t#\\'\"$;é"), max_size=40)


@settings(max_examples=2000, deadline=None)
@given(_quoting_text)
def test_the_quoting_check_says_what_shlex_says(line):
    assert taskfile.quoting_problem(line) == shlex_problem(line)


@settings(max_examples=300, deadline=None)
@given(st.lists(_quoting_text.map(str.strip).filter(lambda s: s and not s.startswith("#")), min_size=1,
                max_size=8))
def test_parse_accepts_or_rejects_lines_as_shlex_did(lines):
    bad = [(n, shlex_problem(line)) for n, line in enumerate(lines, start=1) if shlex_problem(line)]
    text = "\n".join(lines)
    if not bad:
        assert [t.command for t in taskfile.parse(text)] == lines
        return
    with pytest.raises(TaskFileError) as info:
        taskfile.parse(text, "f")
    assert str(info.value).splitlines()[:10] == [f"f:{n}: {why}" for n, why in bad][:10]


def test_a_line_over_the_limit_is_one_error_naming_its_line_and_the_limit():
    long_line = "echo " + "a" * taskfile.MAX_LINE_BYTES
    with pytest.raises(TaskFileError) as info:
        taskfile.parse(f"true\n\n{long_line}\ntrue\n", "tasks.txt")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"tasks.txt:3: a line of {len(long_line):,} bytes is longer than the limit "
                              f"of {taskfile.MAX_LINE_BYTES:,}")
    assert "put the long data in a file" in message


def test_the_limit_counts_bytes_of_utf8_not_characters():
    fits = "echo " + "a" * (taskfile.MAX_LINE_BYTES - 5)
    assert taskfile.parse(fits)[0].command == fits
    wide = "echo " + "é" * (taskfile.MAX_LINE_BYTES // 2)  # 2 bytes each
    with pytest.raises(TaskFileError, match=r"^<tasks>:1: a line of"):
        taskfile.parse(wide)


def test_a_directive_over_the_limit_is_refused_too():
    directive = "#falconet input=" + "x" * taskfile.MAX_LINE_BYTES
    with pytest.raises(TaskFileError, match=r"^f:1: a line of .* longer than the limit"):
        taskfile.parse(directive + "\ntrue\n", "f")


def test_a_long_comment_line_is_skipped():
    assert [t.command for t in taskfile.parse("# " + "x" * (2 * taskfile.MAX_LINE_BYTES) + "\ntrue")] == ["true"]


def test_a_ten_megabyte_line_is_refused_without_its_quoting_checked():
    # Before, shlex took minutes over it; the limit is checked first now.
    with pytest.raises(TaskFileError, match=r"^f:2: a line of 10,000,005 bytes"):
        taskfile.parse("true\necho " + "a" * 10_000_000 + "\n", "f")


def test_a_line_at_the_limit_with_much_quoting_is_checked():
    unit = "'a b' \"c\\\"d\" e\\ f "
    line = "echo " + unit * ((taskfile.MAX_LINE_BYTES - 5) // len(unit))
    assert taskfile.quoting_problem(line) == ""
    assert taskfile.quoting_problem(line + '"') == "no closing quotation: fix the quoting of this command"
