"""`falconet run`: submit a task file, show progress, write results, summarise."""

from __future__ import annotations

import json
import queue
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

from falconet.client import Client, TaskFuture
from falconet.errors import DispatcherUnavailable
from falconet.taskfile import TaskLine

SHOW_FAILURES = 10


@dataclass
class Tally:
    """Counts of a run in progress."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    started_at: float = field(default_factory=time.monotonic)
    failures: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.done + self.failed

    def rate(self) -> float:
        return self.finished / max(time.monotonic() - self.started_at, 1e-9)


def record(fut: TaskFuture, line: TaskLine) -> dict:
    """The JSON Lines record of one finished task."""
    info = fut.info
    rec: dict[str, Any] = {"id": line.line, "line": line.line, "command": line.command}
    exc = fut.exception() if not fut.cancelled() else None
    if fut.cancelled():
        rec.update(state="cancelled", exit_code=None, stdout="", stderr="", reason="cancelled")
    elif exc is not None:
        rec.update(state="failed", exit_code=None, stdout="", stderr="", reason=str(exc))
    else:
        res = fut.result()
        rec.update(state="done" if res.ok else "failed", exit_code=res.exit_code,
                   stdout=res.stdout, stderr=res.stderr, reason=res.reason, truncated=res.truncated)
    rec.update(
        executor=info.executor if info else "", attempts=info.attempts if info else 0,
        submitted=info.submitted if info else None,
        started=(info.started or None) if info else None,
        finished=(info.finished or None) if info else None,
    )
    return rec


def run_tasks(client: Client, lines: list[TaskLine], tally: Tally, *, results: IO[str] | None = None,
              progress: IO[str] | None = sys.stderr, retries: int | None = None,
              walltime_s: float | None = None) -> Tally:
    """Run every line as a shell command and wait for all of them, counting into tally."""
    finished: queue.SimpleQueue = queue.SimpleQueue()
    futures = client.submit_commands([ln.command for ln in lines], retries=retries, walltime_s=walltime_s)
    for fut, line in zip(futures, lines):
        fut.add_done_callback(lambda f, ln=line: finished.put((f, ln)))
    bar = Progress(progress, tally)
    while tally.finished < tally.total:
        try:
            item = finished.get(timeout=0.2)
        except queue.Empty:
            item = None
        while item is not None:
            rec = record(*item)
            if rec["state"] == "done":
                tally.done += 1
            else:
                tally.failed += 1
                if len(tally.failures) < SHOW_FAILURES:
                    tally.failures.append(rec)
            if results is not None:
                results.write(json.dumps(rec) + "\n")
            try:
                item = finished.get_nowait()
            except queue.Empty:
                item = None
        bar.update(client)
    bar.close()
    return tally


class Progress:
    """A one-line progress bar on a terminal; a line every ten seconds elsewhere."""

    def __init__(self, out: IO[str] | None, tally: Tally):
        self.out, self.tally = out, tally
        self.tty = bool(out and out.isatty())
        self.last_draw = self.last_status = 0.0

    def update(self, client: Client) -> None:
        if self.out is None:
            return
        now = time.monotonic()
        if now - self.last_status >= 1.0:
            self.last_status = now
            try:
                counts = client.status(timeout_s=2).get("client", {})
                self.tally.running = counts.get("running", 0) + counts.get("dispatched", 0)
            except DispatcherUnavailable:
                pass
        if now - self.last_draw >= (0.2 if self.tty else 10.0):
            self.last_draw = now
            self._draw(end="" if self.tty else "\n")

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


def summary(tally: Tally) -> str:
    """The closing lines: counts, rate, and the first failures."""
    elapsed = time.monotonic() - tally.started_at
    lines = [f"{tally.total} tasks: {tally.done} done, {tally.failed} failed in {elapsed:.2f}s "
             f"({tally.rate():.0f} tasks/s)"]
    if tally.failures:
        lines.append(f"first failures (of {tally.failed}):")
        for rec in tally.failures:
            err = (rec.get("stderr") or "").strip().splitlines()
            detail = f": {err[-1][:200]}" if err else ""
            lines.append(f"  line {rec['line']}: {rec['command'][:80]}  [{rec['reason']}]{detail}")
    return "\n".join(lines)
