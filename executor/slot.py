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

FLUSH_S = 0.002


def serve(rfd: int, wfd: int) -> None:
    """Run chunks until the executor closes the pipe."""
    functions = runner.FunctionCache()
    while True:
        chunk = pipes.read_frame(rfd)
        if chunk is None:
            return
        unsent: list = []
        oldest = 0.0
        for i, (tid, attempt, kind, body, walltime_s) in enumerate(chunk):
            started = time.time()
            state, output, reason = runner.run(kind, body, walltime_s, functions)
            finished = time.time()
            if not unsent:
                oldest = time.monotonic()
            unsent.append([tid, attempt, state, output, reason, started, finished])
            # A long task's result goes at once; short ones share a write.
            if i == len(chunk) - 1 or finished - started >= FLUSH_S or time.monotonic() - oldest >= FLUSH_S:
                pipes.write_frame(wfd, unsent)
                unsent = []


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
    serve(int(sys.argv[1]), int(sys.argv[2]))


if __name__ == "__main__":
    main()
