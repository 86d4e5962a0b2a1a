"""A slot: one child process of an executor that runs tasks one after another.

It reads chunks of assignments from one pipe and writes result frames to another.  Results
of a chunk are sent together when the chunk ends, after any task that took FLUSH_S or more,
or once the oldest unsent one is FLUSH_S old when a task ends, so tiny tasks cost one pipe
write per chunk rather than per task and long ones are reported the moment they end.  The
tasks a slot holds behind an overdue one go back to the executor when it asks (the reclaim
of executor/pipes.py).
"""

from __future__ import annotations

import collections
import ctypes
import enum
import logging
import os
import select
import signal
import sys
import time

from falconet.executor import pipes, runner
from falconet.executor.pipes import SlotTask

FLUSH_S = 0.005


class Phase(enum.Enum):
    """Where serve() is, for the reclaim signal's handler."""

    IDLE = "idle"  #: reading the pipe for a chunk: nothing to hand back, and free to answer
    BETWEEN = "between"  #: between tasks, maybe writing results: answer before the next task
    RUNNING = "running"  #: in a task: the pipes are untouched, so answer from the handler


class Work:
    """The slot's tasks not yet started, its results not yet sent, and the reclaim asked."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd
        self.phase = Phase.IDLE
        self.pending: collections.deque = collections.deque()  #: SlotTask records of the chunk
        self.unsent: list = []  #: SlotResult records (plain tuples)
        self.oldest = 0.0  #: monotonic time of the oldest unsent result
        self.reclaim = False  #: a reclaim signal waits for its answer
        self.started = 0.0  #: wall time the running task started

    def on_reclaim(self, signum: int, frame: object) -> None:
        """The reclaim signal: answer now if serve() is not using the pipes, else later."""
        if self.phase is Phase.BETWEEN:
            self.reclaim = True
        elif self.phase is Phase.RUNNING:
            self.hand_back(time.time() - self.started)
        else:
            self.hand_back(0.0)

    def hand_back(self, running_s: float) -> None:
        """Answer a reclaim: send the results held, then the tids of every task not
        started, in this chunk and in the chunks still in the pipe, and how long the
        running task has run (0: one starts now, or none)."""
        self.reclaim = False
        tids = [rec[0] for rec in self.pending]
        self.pending.clear()
        if self.phase is not Phase.IDLE:  # reading the pipe here would cut serve's frame
            while select.select([self.rfd], [], [], 0)[0]:
                chunk = pipes.read_frame(self.rfd)  # the executor writes whole frames
                if chunk is None:
                    break
                tids += [rec[0] for rec in chunk]
        self.flush()
        pipes.write_frame(self.wfd, (pipes.FromSlot.HANDED_BACK, [tids, running_s]))

    def flush(self) -> None:
        """Send the results held."""
        if self.unsent:
            pipes.write_frame(self.wfd, (pipes.FromSlot.RESULTS, self.unsent))
            self.unsent = []


def serve(rfd: int, wfd: int, stage: Stage | None = None, work: Work | None = None) -> None:
    """Run chunks until the executor closes the pipe."""
    functions = runner.FunctionCache()
    work = work or Work(rfd, wfd)
    pending, idle, between, running = work.pending, Phase.IDLE, Phase.BETWEEN, Phase.RUNNING
    while True:
        # Each phase is set before the flag is read: a signal before that finds the flag read
        # after, and a signal after is answered by the handler itself.
        work.phase = idle
        if work.reclaim:
            work.hand_back(0.0)
        chunk = pipes.read_frame(rfd)
        if chunk is None:
            return
        work.phase = between
        pending.extend(chunk)
        while pending:
            rec = pending.popleft()
            work.phase = running
            if work.reclaim:
                work.hand_back(0.0)  # the rest of the chunk; this task still runs here, from now
            result = _run(rec, functions, stage, work)
            work.phase = between
            unsent = work.unsent
            if not unsent:
                work.oldest = time.monotonic()
            unsent.append(result)
            # A long task's result goes at once; short ones share a write.
            if not pending or result[6] - result[5] >= FLUSH_S or time.monotonic() - work.oldest >= FLUSH_S:
                work.flush()


def _run(rec: list, functions: runner.FunctionCache, stage: Stage | None, work: Work) -> tuple:
    """Run one task; its SlotResult's fields, as a plain tuple: this is the per-task path."""
    tid, attempt, kind, body, walltime_s, _cpus, files, _prefetched, max_output = rec  # a SlotTask's fields
    work.started = started = time.time()
    counts, uploads = None, False
    if files and stage is not None:
        state, output, reason, files, counts = stage.run(SlotTask._make(rec), functions)
        uploads = _has_outbox_paths(files)
    else:
        state, output, reason = runner.run(kind, body, walltime_s, functions, None, None, max_output)
    if len(output) > max_output:  # never copied out of the slot: it would only be refused
        state, output, reason = runner.FAILED, b"", runner.too_large(len(output), max_output)
    return tid, attempt, state, output, reason, started, time.time(), files, counts, uploads


def _has_outbox_paths(files: bytes) -> bool:
    """Whether a staged task's result files wait in the outbox to be sent to the dispatcher."""
    from falconet import staging  # staged tasks only: plain slots skip the import

    return any("path" in info for _, info in staging.decode_result_files(files))


class Stage:
    """Runs tasks with files in private work dirs, sharing the executor's input cache."""

    def __init__(self, work_root: str, cache_dir: str, cache_bytes: int, outbox: str):
        from falconet.executor.workspace import InputCache

        self.work_root, self.outbox = work_root, outbox
        self.cache = InputCache(cache_dir, cache_bytes)

    def run(self, task: SlotTask, functions: runner.FunctionCache) -> tuple:
        """(state, output, reason, result files, cache counts) of one staged task."""
        from falconet.executor.workspace import run_staged

        return run_staged(task.files, work_root=self.work_root, cache=self.cache, outbox=self.outbox,
                          prefetched=task.prefetched,
                          run=lambda cwd, streams: runner.run(task.kind, task.body, task.walltime_s, functions,
                                                              cwd=cwd, streams=streams,
                                                              max_output=task.max_output))


def _log_to_stderr() -> None:
    """The slot's own warnings (processes a command left behind) go to the executor's log;
    the root logger is left to the Python tasks."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    log = logging.getLogger("falconet.executor")
    log.addHandler(handler)
    log.propagate = False


def _die_with_parent(parent: int) -> None:
    """Get SIGTERM when the executor dies, even by SIGKILL (Linux), and stop at once."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the slot still ends when its pipe closes, after its current chunk
    if os.getppid() != parent:  # the executor died before prctl took effect
        sys.exit(1)


def _terminate(signum: int, frame: object) -> None:
    runner.kill_running_command()
    os._exit(128 + signum)


def main() -> None:
    # The executor decides when slots stop: Ctrl-C in its terminal must not kill tasks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)  # takes the running command's process group along
    _die_with_parent(int(sys.argv[3]))
    stage = Stage(sys.argv[4], sys.argv[5], int(sys.argv[6]), sys.argv[7]) if len(sys.argv) > 7 else None
    work = Work(int(sys.argv[1]), int(sys.argv[2]))
    # The executor starts slots with the reclaim signal blocked, so one sent before this
    # point waits for the handler instead of killing the slot.
    signal.signal(pipes.RECLAIM_SIGNAL, work.on_reclaim)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {pipes.RECLAIM_SIGNAL})
    _log_to_stderr()
    serve(work.rfd, work.wfd, stage, work)


if __name__ == "__main__":
    main()
