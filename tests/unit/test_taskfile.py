"""Task files: one command per line, bad lines reported by file and line number."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import needs, taskfile
from falconet.errors import TaskFileError
from falconet.taskfile import TaskLine


def test_blank_and_comment_lines_are_skipped_and_numbers_kept():
    text = "\n# a comment\necho one\n   \n\t# indented comment\n  echo two  \n\n"
    assert taskfile.parse(text) == [TaskLine(3, "echo one"), TaskLine(6, "echo two")]


def test_windows_line_endings():
    assert taskfile.parse("echo a\r\n\r\necho b\r\n") == [TaskLine(1, "echo a"), TaskLine(3, "echo b")]


def test_trailing_comment_and_quoted_hash_are_part_of_the_command():
    text = "echo 'a # b' # why\necho \"it's\"\n"
    assert taskfile.parse(text) == [TaskLine(1, "echo 'a # b' # why"), TaskLine(2, "echo \"it's\"")]


def test_comment_lines_may_hold_unbalanced_quotes():
    assert taskfile.parse("# don't parse me\necho ok") == [TaskLine(2, "echo ok")]


def test_empty_text_has_no_commands():
    assert taskfile.parse("") == []
    assert taskfile.parse("\n\n# only comments\n") == []


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("echo 'unbalanced", "no closing quotation"),
        ('echo "unbalanced', "no closing quotation"),
        ("echo trailing\\", "no escaped character"),
    ],
)
def test_bad_quoting_is_reported_with_file_and_line(line, problem):
    with pytest.raises(TaskFileError) as info:
        taskfile.parse(f"echo ok\n\n{line}\n", source="jobs.txt")
    assert str(info.value).startswith(f"jobs.txt:3: {problem}")


def test_every_bad_line_is_reported():
    text = "echo 'a\necho ok\necho \"b\n# fine\necho c'\n"
    with pytest.raises(TaskFileError) as info:
        taskfile.parse(text, source="t")
    lines = str(info.value).splitlines()
    assert [line.split(": ")[0] for line in lines] == ["t:1", "t:3", "t:5"]


def test_many_bad_lines_are_summarised():
    with pytest.raises(TaskFileError) as info:
        taskfile.parse("echo '\n" * 13, source="t")
    lines = str(info.value).splitlines()
    assert [line.split(": ")[0] for line in lines[:10]] == [f"t:{n}" for n in range(1, 11)]
    assert lines[10] == "... and 3 more bad lines" and len(lines) == 11


def test_nul_byte_is_reported():
    with pytest.raises(TaskFileError, match=r"^t:2: contains a NUL byte"):
        taskfile.parse("echo ok\necho a\x00b\n", source="t")


def test_read_parses_a_file(tmp_path):
    path = tmp_path / "tasks.txt"
    path.write_text("# header\necho 1\n\necho 2\n", encoding="utf-8")
    assert taskfile.read(str(path)) == [TaskLine(2, "echo 1"), TaskLine(4, "echo 2")]


def test_read_reports_bad_lines_with_the_path(tmp_path):
    path = tmp_path / "tasks.txt"
    path.write_text("echo ok\necho 'oops\n", encoding="utf-8")
    with pytest.raises(TaskFileError, match=f"^{re.escape(str(path))}:2: no closing quotation"):
        taskfile.read(str(path))


def test_read_reports_a_nul_byte_in_a_file(tmp_path):
    path = tmp_path / "tasks.txt"
    path.write_bytes(b"echo \x00\n")
    with pytest.raises(TaskFileError, match=f"^{re.escape(str(path))}:1: contains a NUL byte"):
        taskfile.read(str(path))


def test_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("echo ok\necho café\n".encode("latin-1"))
    with pytest.raises(TaskFileError, match=f"^{re.escape(str(path))}: not UTF-8 text .* at byte 16"):
        taskfile.read(str(path))


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(TaskFileError, match=f"^{re.escape(str(path))}: No such file"):
        taskfile.read(str(path))


def test_directory_is_refused(tmp_path):
    with pytest.raises(TaskFileError, match=f"^{re.escape(str(tmp_path))}: "):
        taskfile.read(str(tmp_path))


@pytest.mark.parametrize("sep", ["\x0c", "\x85", "\u2028"], ids=["form-feed", "NEL", "LINE-SEPARATOR"])
def test_only_newlines_end_a_line(sep):
    assert taskfile.parse(f"echo a{sep}b\necho c\n") == [TaskLine(1, f"echo a{sep}b"), TaskLine(2, "echo c")]


# ---------------------------------------------------------------- property

_WORD_CHARS = st.characters(
    codec="utf-8",
    exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),  # no controls, spaces or line breaks
    exclude_characters="'\"\\#",
)
_WORDS = st.one_of(
    st.text(_WORD_CHARS, min_size=1, max_size=8),
    st.text(_WORD_CHARS, max_size=8).map(lambda w: f"'{w}'"),
    st.text(_WORD_CHARS, max_size=8).map(lambda w: f'"{w}"'),
)
COMMANDS = st.lists(_WORDS, min_size=1, max_size=5).map(" ".join)
BLANKS = st.sampled_from(["", " ", "\t", "  \t "])
COMMENTS = st.builds(
    lambda indent, body: f"{indent}#{body}",
    st.sampled_from(["", "  ", "\t"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.one_of(COMMANDS.map(lambda c: ("cmd", c)), BLANKS.map(lambda b: ("skip", b)),
                  COMMENTS.map(lambda c: ("skip", c))),
        max_size=30,
    ),
    trailing_newline=st.booleans(),
)
def test_parse_returns_exactly_the_commands_with_their_line_numbers(lines, trailing_newline):
    text = "\n".join(text for _, text in lines) + ("\n" if trailing_newline else "")
    expected = [TaskLine(n, text) for n, (kind, text) in enumerate(lines, start=1) if kind == "cmd"]
    assert taskfile.parse(text) == expected


# ---------------------------------------------------------------- directives

Options = taskfile.Options


def test_a_directive_applies_to_the_lines_after_it_until_the_next():
    text = "echo a\n#falconet cpus=2 memory=500\necho b\n\necho c\n#falconet tag=gpu\necho d\n"
    two = Options(needs.make(cpus=2, memory=500))
    assert taskfile.parse(text) == [
        TaskLine(1, "echo a"), TaskLine(3, "echo b", two), TaskLine(5, "echo c", two),
        TaskLine(7, "echo d", Options(needs.make(tags=["gpu"]))),
    ]


@pytest.mark.parametrize("reset", ["#falconet reset", "#falconet", "  #falconet   ", "#falconet reset  # back"])
def test_reset_and_a_bare_directive_return_to_no_directive(reset):
    lines = taskfile.parse(f"#falconet cpus=4\necho a\n{reset}\necho b\n")
    assert lines[0].options.needs.cpus == 4
    assert lines[1] == TaskLine(4, "echo b") and lines[1].options is None


def test_a_directive_replaces_the_previous_one_entirely():
    text = "#falconet cpus=4 tag=gpu input=a.txt retries=1\necho a\n#falconet memory=100\necho b\n"
    assert taskfile.parse(text)[1].options == Options(needs.make(memory=100))


def test_tags_inputs_retries_and_walltime():
    text = ("#falconet tags=gpu,ssd tag=zone=a where=cloud arch=aarch64 input=ref.fa "
            "input=s3://bucket/idx 'input=my file.txt' retries=0 walltime=2.5\necho a\n")
    (line,) = taskfile.parse(text)
    assert line.options == Options(needs.make(tags=["gpu", "ssd", "zone=a"], where="cloud", arch="arm64"),
                                   ("ref.fa", "s3://bucket/idx", "my file.txt"), 0, 2.5)


@pytest.mark.parametrize(("value", "cap"), [("4000000", 4_000_000), ("10M", 10 << 20), ("64KiB", 64 << 10)])
def test_output_cap_takes_bytes_or_a_suffix(value, cap):
    (line,) = taskfile.parse(f"#falconet output-cap={value}\necho a\n")
    assert line.options == Options(output_cap=cap)


def test_a_bad_output_cap_is_reported_with_file_and_line():
    with pytest.raises(TaskFileError, match="t.txt:1: directive: output-cap: 'lots' is not a size"):
        taskfile.parse("#falconet output-cap=lots\necho a\n", "t.txt")


def test_lines_under_one_directive_share_its_options_object():
    lines = taskfile.parse("#falconet cpus=2\n" + "true\n" * 3)
    assert lines[0].options is lines[1].options is lines[2].options


@pytest.mark.parametrize("comment", ["#falconets cpus=2", "# falconet cpus=2", "#falconet:cpus=2", "##falconet"])
def test_other_comments_stay_comments(comment):
    assert taskfile.parse(f"{comment}\necho a\n") == [TaskLine(2, "echo a")]


@pytest.mark.parametrize(
    ("directive", "problem"),
    [
        ("#falconet gpus=1", "unknown key 'gpus'"),
        ("#falconet cpus=two", "cpus must be a whole number"),
        ("#falconet cpus=0", "cpus must be a whole number of at least 1"),
        ("#falconet cpus", "is not key=value"),
        ("#falconet where=moon", "where must be one of any, local, cloud"),
        ("#falconet arch=sparc", "arch must be one of"),
        ("#falconet prefer=local where=cloud", "prefer='local' needs where='any'"),
        ("#falconet input=", "'input=' is not input=VALUE"),
        ("#falconet retries=-1", "retries must be a whole number, 0 or more"),
        ("#falconet walltime=soon", "walltime must be seconds"),
        ("#falconet walltime=inf", "walltime must be seconds"),
        ("#falconet reset cpus=2", "'reset' stands alone"),
        ("#falconet input='unclosed", "no closing quotation"),
    ],
)
def test_a_bad_directive_is_reported_with_file_and_line(directive, problem):
    with pytest.raises(TaskFileError) as info:
        taskfile.parse(f"echo ok\n{directive}\necho a\n", source="jobs.txt")
    assert str(info.value).startswith("jobs.txt:2: directive: ") and problem in str(info.value)


def test_bad_directives_and_bad_lines_are_reported_together():
    with pytest.raises(TaskFileError) as info:
        taskfile.parse("#falconet cpus=x\necho 'a\n#falconet nope=1\n", source="t")
    assert [line.split(": ")[0] for line in str(info.value).splitlines()] == ["t:1", "t:2", "t:3"]


DIRECTIVE_WORDS = st.one_of(
    st.integers(1, 64).map(lambda n: f"cpus={n}"),
    st.integers(0, 10**6).map(lambda n: f"memory={n}"),
    st.sampled_from(["arch=x86_64", "arch=arm64", "arch=amd64", "where=any", "where=local", "where=cloud",
                     "tag=gpu", "tag=site=cloud", "tags=a,b", "input=ref.fa", "input=s3://b/k",
                     "retries=2", "walltime=1.5"]),
)
DIRECTIVES = st.one_of(st.just(["reset"]), st.lists(DIRECTIVE_WORDS, max_size=5))


def _expected(words: list[str]) -> Options | None:
    """The options a directive of these words should give, worked out without the parser."""
    if words in ([], ["reset"]):
        return None
    pairs = [w.partition("=")[::2] for w in words]
    return Options(needs.parse_assignments([w for w in words if w.partition("=")[0] in taskfile._NEEDS_KEYS]),
                   tuple(v for k, v in pairs if k == "input"),
                   next((int(v) for k, v in reversed(pairs) if k == "retries"), None),
                   next((float(v) for k, v in reversed(pairs) if k == "walltime"), None))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(COMMANDS.map(lambda c: ("cmd", c)), DIRECTIVES.map(lambda d: ("dir", d))),
                max_size=30))
def test_every_line_gets_the_options_of_the_last_directive_before_it(items):
    text = "\n".join(" ".join(["#falconet", *x]) if kind == "dir" else x for kind, x in items)
    parsed = iter(taskfile.parse(text))
    last = None
    for kind, x in items:
        if kind == "dir":
            last = _expected(x)
        else:
            line = next(parsed)
            assert line.command == x and line.options == last
    assert next(parsed, None) is None
