"""A slot: one child process of an executor that runs tasks one after another.

It reads chunks of assignments from one pipe and writes result frames to another.  Results
of a chunk are sent together when the chunk ends, after any task that took FLUSH_S or more,
or as soon as the oldest unsent one is FLUSH_S old, so tiny tasks cost one pipe write per
chunk rather than per task and long ones are reported the moment they end.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

from falconet.executor import pipes, runner
from falconet.executor.pipes import SlotTask

FLUSH_S = 0.002


def serve(rfd: int, wfd: int, stage: Stage | None = None) -> None:
    """Run chunks until the executor closes the pipe."""
    functions = runner.FunctionCache()
    while True:
        chunk = pipes.read_frame(rfd)
        if chunk is None:
            return
        unsent: list = []
        oldest = 0.0
        for i, rec in enumerate(chunk):
            tid, attempt, kind, body, walltime_s, _cpus, files, _prefetched, max_output = rec  # a SlotTask's fields
            started = time.time()
            counts, uploads = None, False
            if files and stage is not None:
                state, output, reason, files, counts = stage.run(SlotTask._make(rec), functions)
                uploads = _has_outbox_paths(files)
            else:
                state, output, reason = runner.run(kind, body, walltime_s, functions, max_output=max_output)
            if len(output) > max_output:  # never copied out of the slot: it would only be refused
                state, output, reason = runner.FAILED, b"", runner.too_large(len(output), max_output)
            finished = time.time()
            if not unsent:
                oldest = time.monotonic()
            # A SlotResult's fields, as a plain tuple: this is the per-task path.
            unsent.append((tid, attempt, state, output, reason, started, finished, files, counts, uploads))
            # A long task's result goes at once; short ones share a write.
            if i == len(chunk) - 1 or finished - started >= FLUSH_S or time.monotonic() - oldest >= FLUSH_S:
                pipes.write_frame(wfd, unsent)
                unsent = []


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
    serve(int(sys.argv[1]), int(sys.argv[2]), stage)


if __name__ == "__main__":
    main()
