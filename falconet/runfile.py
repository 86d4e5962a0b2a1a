"""`falconet run` and `falconet submit`: submit command lines, show progress, write results.

`run` submits a task file's lines in runs of identical options (one submission per run), each
with its directive's requirements and inputs, or the run's defaults for lines with no
directive (see falconet.taskfile).  `submit` runs one command and hands back its record.

A command keeps at most its output cap (1 MiB by default) of stdout and of stderr; the
summary counts the tasks whose output was cut.  With an output dir, each line's stdout and
stderr go whole to files named after its line number instead (see stream_files).
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import json
import queue
import shlex
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from falconet import needs as nd
from falconet import staging, tasks
from falconet.client import Client, TaskFuture
from falconet.errors import DispatcherUnavailable, FalconetError, TaskFileError
from falconet.reports import Status
from falconet.taskfile import Options, TaskLine

SHOW_FAILURES = 10
NO_EXECUTOR_NOTE_S = 3.0  #: without executors this long, the bar says so (they may be starting)
NO_OPTIONS = Options()


@dataclass
class Tally:
    """Counts of a run in progress."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    started_at: float = field(default_factory=time.monotonic)
    failures: list[dict] = field(default_factory=list)
    truncated: int = 0  #: tasks whose stdout or stderr was cut at their output cap
    caps: set[int] = field(default_factory=set)  #: the output caps they were cut at

    @property
    def finished(self) -> int:
        return self.done + self.failed

    def rate(self) -> float:
        return self.finished / max(time.monotonic() - self.started_at, 1e-9)

    def count(self, rec: dict, cap: int) -> None:
        """Add one finished task's record (run with this output cap)."""
        if rec["state"] == "done":
            self.done += 1
        else:
            self.failed += 1
            if len(self.failures) < SHOW_FAILURES:
                self.failures.append(rec)
        if rec.get("truncated"):
            self.truncated += 1
            self.caps.add(cap)


def outcome(fut: TaskFuture) -> dict[str, Any]:
    """How a finished task ended: state, exit code, output, reason, timings, outputs."""
    info = fut.info
    rec: dict[str, Any] = {}
    exc = fut.exception() if not fut.cancelled() else None
    if fut.cancelled():
        rec.update(state="cancelled", exit_code=None, stdout="", stderr="", reason="cancelled", truncated=False)
    elif exc is not None:
        rec.update(state="failed", exit_code=None, stdout="", stderr="", reason=str(exc), truncated=False)
    else:
        res = fut.result()
        rec.update(state="done" if res.ok else "failed", exit_code=res.exit_code,
                   stdout=res.stdout, stderr=res.stderr, reason=res.reason, truncated=res.truncated)
    rec.update(
        executor=info.executor if info else "", attempts=info.attempts if info else 0,
        submitted=info.submitted if info else None,
        started=(info.started or None) if info else None,
        finished=(info.finished or None) if info else None,
        outputs=dict(fut.outputs),
    )
    return rec


def record(fut: TaskFuture, line: TaskLine, needs: str = str(nd.PLAIN)) -> dict:
    """The JSON Lines record of one finished task; needs is str() of the needs it ran with."""
    rec: dict[str, Any] = {"id": line.line, "line": line.line, "command": line.command, "needs": needs}
    rec.update(outcome(fut))
    return rec


def placement(needs: nd.Needs, inputs: Sequence = (), outputs: Sequence = ()) -> dict[str, Any]:
    """Client keyword arguments for these requirements and files; {} for a plain task."""
    kw: dict[str, Any] = {}
    if needs != nd.PLAIN:
        kw.update(cpus=needs.cpus, memory=needs.memory_mb, arch=needs.arch, tags=needs.tags,
                  where=needs.where, prefer=needs.prefer)
    if inputs:
        kw["inputs"] = list(inputs)
    if outputs:
        kw["outputs"] = list(outputs)
    return kw


def runs(lines: list[TaskLine]) -> Iterator[list[TaskLine]]:
    """Consecutive lines with identical options, in order (a whole plain file is one run)."""
    start = 0
    for i in range(1, len(lines)):
        a, b = lines[i].options, lines[start].options
        if a is not b and a != b:  # lines under one directive share its Options object
            yield lines[start:i]
            start = i
    if lines:
        yield lines[start:]


def check_inputs(lines: list[TaskLine], defaults: Options | None, source: str) -> None:
    """Raise TaskFileError naming the first line of each run whose inputs cannot be staged."""
    problems = []
    for group in runs(lines):
        opts = group[0].options or defaults or NO_OPTIONS
        if opts.inputs:
            try:
                check_files(opts.inputs)
            except FalconetError as exc:
                problems.append(f"{source}:{group[0].line}: {exc}")
    if problems:
        raise TaskFileError("\n".join(problems[:10]))


def run_tasks(client: Client, lines: list[TaskLine], tally: Tally, *, results: IO[str] | None = None,
              progress: IO[str] | None = sys.stderr, retries: int | None = None,
              walltime_s: float | None = None, output_cap: int | None = None,
              output_dir: str | None = None, defaults: Options | None = None,
              show_output: IO[str] | None = None, provisioned: bool = False) -> Tally:
    """Run every line as a shell command and wait for all of them, counting into tally.

    defaults: the requirements and inputs of lines without a directive; retries, walltime_s
    and output_cap: of lines whose directive does not set them; output_dir: where each
    line's stdout and stderr go whole (see stream_files), instead of its record;
    show_output: where each task's stdout is written as it finishes, its lines tagged;
    provisioned: a provisioner starts the executors (the bar says so while there are none).
    """
    finished: queue.SimpleQueue = queue.SimpleQueue()
    submit_runs(client, lines, lambda f, ln, n, cap: finished.put((f, ln, n, cap)), defaults=defaults,
                retries=retries, walltime_s=walltime_s, output_cap=output_cap, output_dir=output_dir)
    bar = Progress(progress, tally, provisioned=provisioned)
    while tally.finished < tally.total:
        try:
            item = finished.get(timeout=0.2)
        except queue.Empty:
            item = None
        while item is not None:
            fut, line, needs, cap = item
            rec = record(fut, line, needs)
            tally.count(rec, cap)
            if results is not None:
                results.write(json.dumps(rec) + "\n")
            if show_output is not None and rec["stdout"]:
                bar.above(lambda r=rec: _show(show_output, tagged(r["line"], r["stdout"])))
            try:
                item = finished.get_nowait()
            except queue.Empty:
                item = None
        bar.update(client)
    bar.close()
    return tally


def tagged(line: int, text: str) -> str:
    """text with each of its lines prefixed by the task's line number, as '[12] ...'."""
    tag = f"[{line}] "
    return "".join(tag + ln for ln in text.splitlines(keepends=True)) + ("" if text.endswith("\n") else "\n")


def _show(out: IO[str], text: str) -> None:
    out.write(text)
    out.flush()  # as each task finishes, also into a pipe


def output_spec(text: str) -> str | tuple[str, str]:
    """An --output value: NAME (delivered to ./NAME) or NAME=DEST (a path or s3:// URL)."""
    name, eq, dest = text.partition("=")
    return (name, dest) if eq else text


def check_files(inputs: Sequence, outputs: Sequence = (), streams: dict | None = None) -> None:
    """Raise StagingError, saying what to fix, if these inputs, outputs or stream files cannot be staged."""
    staging.spec_from_user(inputs, outputs, streams=streams)


def stream_files(output_dir: str, line: int) -> dict[str, str]:
    """Where a line's streams go under an output dir: DIR/<line>.out and DIR/<line>.err
    (DIR may be an s3://bucket/prefix)."""
    base = f"{output_dir.rstrip('/')}/{line}"
    return {"stdout": base + ".out", "stderr": base + ".err"}


def submit_runs(client: Client, lines: list[TaskLine], on_done: Callable[[TaskFuture, TaskLine, str, int], None],
                *, defaults: Options | None, retries: int | None, walltime_s: float | None,
                output_cap: int | None = None, output_dir: str | None = None) -> None:
    """Submit each run of lines with its options; on_done(future, line, str(needs), output cap)
    as each ends.  With output_dir, each line is a task of its own (its files differ).

    If a run cannot be submitted (an input vanished), the runs already submitted are cancelled.
    """
    plan = []
    for group in runs(lines):
        opts = group[0].options or defaults or NO_OPTIONS
        cap = output_cap if opts.output_cap is None else opts.output_cap
        plan.append((group, opts, tasks.DEFAULT_OUTPUT_CAP if cap is None else cap))
    for cap in sorted({cap for *_, cap in plan}, reverse=True):
        client.check_output_cap(cap)  # before anything runs
    submitted: list[TaskFuture] = []
    try:
        for group, opts, cap in plan:
            common = dict(placement(opts.needs, opts.inputs), output_cap=cap,
                          retries=retries if opts.retries is None else opts.retries,
                          walltime_s=walltime_s if opts.walltime_s is None else opts.walltime_s)
            if output_dir:
                futures = [client.submit_command(ln.command, **common, **stream_files(output_dir, ln.line))
                           for ln in group]
            else:
                futures = client.submit_commands([ln.command for ln in group], **common)
            submitted += futures
            done = RunDone(group, futures, str(opts.needs), cap, on_done)
            for fut in futures:
                fut.add_done_callback(done)
    except BaseException:
        for fut in submitted:
            fut.cancel()
        raise


class RunDone:
    """The one done callback of a run's futures: finds the line a future ran by its seq.

    A closure per line costs about 250 bytes for the whole run; this costs 8 (the seqs of
    one submission rise with the lines).
    """

    __slots__ = ("lines", "seqs", "needs", "cap", "on_done")

    def __init__(self, lines: list[TaskLine], futures: list[TaskFuture], needs: str, cap: int,
                 on_done: Callable[[TaskFuture, TaskLine, str, int], None]):
        self.lines, self.needs, self.cap, self.on_done = lines, needs, cap, on_done
        self.seqs = array("q", [f.seq for f in futures])

    def __call__(self, fut: TaskFuture) -> None:
        line = self.lines[bisect.bisect_left(self.seqs, fut.seq)]
        self.on_done(fut, line, self.needs, self.cap)


def submit_one(client: Client, command: str | list[str], options: Options = NO_OPTIONS, *,
               outputs: Sequence = (), retries: int | None = None, walltime_s: float | None = None,
               output_cap: int = tasks.DEFAULT_OUTPUT_CAP, stdout: str | None = None,
               stderr: str | None = None) -> dict:
    """Run one command (a shell line or an argv), wait for it, and return its record."""
    fut = client.submit_command(command, retries=retries, walltime_s=walltime_s, output_cap=output_cap,
                                stdout=stdout, stderr=stderr,
                                **placement(options.needs, options.inputs, outputs))
    cf.wait([fut])  # a failure to run is in the record, not raised
    label = command if isinstance(command, str) else shlex.join(command)
    return {"command": label, "needs": str(options.needs), **outcome(fut)}


def exit_status(rec: dict) -> int:
    """The command's exit status for the shell (128+N if killed by signal N).

    1 if it never ran, or if it exited 0 but its task failed all the same (an output
    it should have left was not there).
    """
    code = rec.get("exit_code")
    if code is None:
        return 1
    status = 128 - code if code < 0 else min(code, 255)
    return 1 if status == 0 and rec.get("state") != "done" else status


def failure_note(rec: dict) -> str:
    """Why a task failed, when its exit status alone does not say it; '' otherwise."""
    reason = rec.get("reason") or ""
    if rec.get("state") == "done" or not reason or reason == f"exit code {rec.get('exit_code')}":
        return ""
    return f"the task {rec['state']}: {reason}"


class Progress:
    """A one-line progress bar on a terminal; a line every ten seconds elsewhere.

    Above the bar, once each: why tasks cannot run (unschedulable, with the dispatcher's
    reason) and that no executor is there yet, so that a bar that does not move says why.
    """

    def __init__(self, out: IO[str] | None, tally: Tally, provisioned: bool = False):
        self.out, self.tally = out, tally
        self.tty = bool(out and out.isatty())
        self.last_draw = self.last_status = 0.0
        self.noted: set[str] = set()
        self.provisioned = provisioned

    def update(self, client: Client) -> None:
        if self.out is None:
            return
        now = time.monotonic()
        if now - self.last_status >= 1.0:
            self.last_status = now
            try:
                self._observe(Status.from_map(client.status(timeout_s=2)))
            except DispatcherUnavailable:
                pass
        if now - self.last_draw >= (0.2 if self.tty else 10.0):
            self.last_draw = now
            self._draw(end="" if self.tty else "\n")

    def _observe(self, status: Status) -> None:
        self.tally.running = status.client.get("running", 0)  # started ones: not those held for a slot
        if not status.executors and self.tally.finished < self.tally.total:
            if self.provisioned:
                self.note("starting executors: the provisioner adds them while work waits")
            elif time.monotonic() - self.tally.started_at >= NO_EXECUTOR_NOTE_S:
                self.note("waiting for executors: none is connected to the dispatcher yet")
        for u in status.unschedulable:
            self.note(f"unschedulable: {u.count} tasks can never run here: {u.reason}", key=u.reason)

    def above(self, write: Callable[[], Any]) -> None:
        """Call write (which prints elsewhere, e.g. on stdout) with the bar out of its way."""
        if self.tty:
            self.out.write("\r\x1b[K")  # type: ignore[union-attr]
            self.out.flush()  # type: ignore[union-attr]
        write()
        if self.tty:
            self._draw(end="")

    def note(self, text: str, key: str = "") -> None:
        """Print text above the bar, once for each key (the text itself by default)."""
        key = key or text
        if self.out is None or key in self.noted:
            return
        self.noted.add(key)
        self.out.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        if self.tty:
            self._draw(end="")
        self.out.flush()

    def _draw(self, end: str) -> None:
        t = self.tally
        width = 30
        filled = int(width * t.finished / t.total) if t.total else width
        bar = "#" * filled + "-" * (width - filled)
        line = (f"[{bar}] {t.finished}/{t.total}  done {t.done}  failed {t.failed}  "
                f"running {t.running}  {t.rate():.0f} tasks/s")
        prefix = "\r\x1b[K" if self.tty else ""
        self.out.write(prefix + line + end)  # type: ignore[union-attr]
        self.out.flush()  # type: ignore[union-attr]

    def close(self) -> None:
        if self.out is not None and self.tty:
            self.tally.running = 0
            self._draw(end="\n")


def truncation_warning(what: str, caps: set[int], file_option: str) -> str:
    """'WHAT cut to 1 MiB per stream (--output-cap to raise it, FILE_OPTION to keep it whole)'."""
    at = " or ".join(tasks.format_bytes(c) for c in sorted(caps))
    return f"{what} cut to {at} per stream (--output-cap to raise it, {file_option} to keep it whole)"


def summary(tally: Tally) -> str:
    """The closing lines: counts, rate, truncated output, and the first failures."""
    elapsed = time.monotonic() - tally.started_at
    lines = [f"{tally.total} tasks: {tally.done} done, {tally.failed} failed in {elapsed:.2f}s "
             f"({tally.rate():.0f} tasks/s)"]
    if tally.truncated:
        what = "1 task had its output" if tally.truncated == 1 else f"{tally.truncated} tasks had output"
        lines.append(truncation_warning(what, tally.caps, "--output-dir"))
    if tally.failures:
        lines.append(f"first failures (of {tally.failed}):")
        for rec in tally.failures:
            err = (rec.get("stderr") or "").strip().splitlines()
            err_file = rec.get("outputs", {}).get(staging.STREAM_FILES["stderr"])
            detail = f": {err[-1][:200]}" if err else f" (stderr in {err_file})" if err_file else ""
            lines.append(f"  line {rec['line']}: {rec['command'][:80]}  [{rec['reason']}]{detail}")
    return "\n".join(lines)
