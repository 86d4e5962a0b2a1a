"""The futures a Client hands out, and a concurrent.futures.Executor over a Client.

A :class:`TaskFuture` is a plain ``concurrent.futures.Future`` plus what the dispatcher
said about its task; :func:`settle` turns a task's result into the future's value or
exception.  :class:`FuturesExecutor` lets code written for ``concurrent.futures`` run its
calls on falconet's executors.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from falconet import protocol as p
from falconet import tasks
from falconet.errors import TaskError

if TYPE_CHECKING:
    from falconet.client import Client

_CANCELLED = int(p.TaskState.CANCELLED)


class TaskFuture(cf.Future):
    """A Future for one task; ``info`` holds the dispatcher's record once it finished."""

    def __init__(self, client: Client, seq: int, kind: int, label: str = ""):
        super().__init__()
        self.seq = seq
        self.kind = kind
        self.label = label  #: the command line, or the function's name
        self.info: p.TaskResult | None = None
        self.outputs: dict[str, str] = {}  #: staged output name -> where it was delivered
        self.blobs: tuple[str, ...] = ()  #: inputs uploaded to the dispatcher for this task
        self.dests: dict[str, str] = {}  #: output name -> the path on this machine it asked for
        self._client = client

    def cancel(self) -> bool:
        """Cancel locally and ask the dispatcher to drop the task if it has not started."""
        if self._cancel_once():
            self._client._cancel(self.seq)
            return True
        return self.cancelled()

    def cancel_here(self) -> bool:
        """Mark the future cancelled, telling no one (a task that was never sent)."""
        return self._cancel_once() or self.cancelled()

    def _cancel_once(self) -> bool:
        """Cancel and notify waiters; True only for the call that did it (a second cancel()
        must not notify again: concurrent.futures raises on that)."""
        with self._condition:  # reentrant: cancel() and the notify take it too
            if self.cancelled() or not super().cancel():
                return False
            self.set_running_or_notify_cancel()  # wakes wait() and as_completed()
            return True


def settle(fut: TaskFuture, r: p.TaskResult) -> None:
    """Set a future from its result (raises InvalidStateError if it was just cancelled)."""
    if r.state == _CANCELLED:
        fut.cancel_here()
        return
    try:
        if fut.kind == p.TaskKind.COMMAND:
            if not r.output:
                raise TaskError(r.reason, executor=r.executor, attempts=r.attempts)
            code, out, err, truncated = tasks.decode_command_output(r.output)
            fut.set_result(tasks.CommandResult(
                code, out, err, truncated, r.executor, r.attempts,
                {"submitted": r.submitted, "started": r.started, "finished": r.finished},
                r.reason, fut.outputs))
        elif not r.output:
            raise TaskError(r.reason, executor=r.executor, attempts=r.attempts)
        else:
            fut.set_result(tasks.decode_python_output(r.output))
    except BaseException as exc:
        fut.set_exception(exc)


def results_in_order(futures: list[TaskFuture], timeout: float | None,
                     clock: Callable[[], float] = time.monotonic) -> Iterator[Any]:
    """The futures' values in order, as Executor.map gives them; the rest are cancelled
    when the caller stops early or a result raises."""
    deadline = None if timeout is None else clock() + timeout
    try:
        for fut in futures:
            yield fut.result(None if deadline is None else max(0.0, deadline - clock()))
    finally:
        for fut in futures:
            fut.cancel()


class FuturesExecutor(cf.Executor):
    """A concurrent.futures.Executor whose calls run on a falconet Client's executors.

    Not an executor process (that is `falconet executor`): the name says which kind it is.
    """

    def __init__(self, client: Client):
        self._client = client
        self._futures: weakref.WeakSet[TaskFuture] = weakref.WeakSet()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Run fn(*args, **kwargs) through the client."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut = self._client.submit(fn, *args, **kwargs)
        self._futures.add(fut)
        return fut

    def map(self, fn: Callable[..., Any], *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Client.map: results in order."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._client.map(fn, *iterables, timeout=timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; cancel_futures cancels those not finished; wait waits for the rest."""
        self._shutdown = True
        futures = list(self._futures)
        if cancel_futures:
            for f in futures:
                f.cancel()
        if wait:
            cf.wait(futures)


#: The old name of FuturesExecutor, kept for one release (it read like the executor process).
FalconetExecutor = FuturesExecutor
