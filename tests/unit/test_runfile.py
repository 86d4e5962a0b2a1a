"""`falconet run`'s bookkeeping without a cluster: the tally, the summary, stream file names."""

from __future__ import annotations

from falconet import runfile


def rec(line: int, state: str = "done", truncated: bool = False, **extra) -> dict:
    return {"line": line, "command": f"task {line}", "state": state, "reason": "" if state == "done" else "exit code 1",
            "stderr": "", "truncated": truncated, "outputs": {}, **extra}


def test_the_summary_says_how_many_tasks_had_output_cut_and_what_to_do():
    tally = runfile.Tally(4)
    for r, cap in [(rec(1, truncated=True), 1 << 20), (rec(2), 1 << 20), (rec(3, truncated=True), 1 << 20),
                   (rec(4, "failed", truncated=True), 4_000_000)]:
        tally.count(r, cap)
    assert (tally.done, tally.failed, tally.truncated) == (3, 1, 3)
    lines = runfile.summary(tally).splitlines()
    assert lines[1] == ("3 tasks had output cut to 1 MiB or 3.8 MiB per stream "
                        "(--output-cap to raise it, --output-dir to keep it whole)")


def test_one_cut_task_and_none():
    tally = runfile.Tally(1)
    tally.count(rec(1, truncated=True), 1 << 20)
    assert "1 task had its output cut to 1 MiB per stream" in runfile.summary(tally)
    clean = runfile.Tally(1)
    clean.count(rec(1), 1 << 20)
    assert "cut" not in runfile.summary(clean)


def test_a_failure_whose_stderr_went_to_a_file_points_to_it():
    tally = runfile.Tally(1)
    tally.count(rec(7, "failed", outputs={".falconet-stderr": "/out/7.err"}), 1 << 20)
    assert "line 7: task 7  [exit code 1] (stderr in /out/7.err)" in runfile.summary(tally)


def test_stream_files_are_named_by_line_number():
    assert runfile.stream_files("out/", 12) == {"stdout": "out/12.out", "stderr": "out/12.err"}
    assert runfile.stream_files("s3://b/run1", 3)["stderr"] == "s3://b/run1/3.err"
