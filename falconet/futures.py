"""The futures a Client hands out, and a concurrent.futures.Executor over a Client.

A :class:`TaskFuture` is a plain ``concurrent.futures.Future`` plus what the dispatcher
said about its task; :func:`settle` turns a task's result into the future's value or
exception.  :class:`FuturesExecutor` lets code written for ``concurrent.futures`` run its
calls on falconet's executors.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from falconet import protocol as p
from falconet import tasks
from falconet.errors import TaskError

if TYPE_CHECKING:
    from falconet.client import Client

_CANCELLED = int(p.TaskState.CANCELLED)
# The standard library's state strings (concurrent.futures._base), for mark_running
_PENDING_STATE, _RUNNING_STATE, _FINISHED_STATE = cf._base.PENDING, cf._base.RUNNING, cf._base.FINISHED
_CANCELLED_STATES = frozenset({cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED})
_DONE_STATES = _CANCELLED_STATES | {cf._base.FINISHED}
_NONE: Mapping[str, str] = types.MappingProxyType({})  #: no outputs, no destinations (shared)
_MAKING_CONDITION = threading.Lock()  # one Condition per future, however many threads ask at once


class TaskFuture(cf.Future):
    """A Future for one task; ``info`` holds the dispatcher's record once it finished.

    It is *running* once the dispatcher reports that an executor handed the task to a slot
    (a ``Started`` message); from then on :meth:`cancel` returns False, as with the
    standard library's executors.
    """

    # cf.Future.__init__'s fields, as class defaults until a future needs its own: a run of
    # 100,000 lines queues as many futures, most of which nobody waits on before they
    # finish.  The Condition (about 1 KB: a deque, an RLock and bound methods) and the list
    # of waiters are made on first use (see _condition), the list of callbacks with the
    # first callback; a future holds four fields of its own until it finishes.
    _state = _PENDING_STATE
    _result = _exception = None
    _waiters: list | tuple = ()  # iterated empty; appended to only under the Condition
    _done_callbacks: list | tuple = ()
    _made_condition: threading.Condition | None = None
    info: p.TaskResult | None = None  #: the dispatcher's record of the task, once it finished
    outputs: Mapping[str, str] = _NONE  #: staged output name -> where it was delivered
    blobs: tuple[str, ...] = ()  #: inputs uploaded to the dispatcher for this task
    dests: Mapping[str, str] = _NONE  #: output name -> the path on this machine it asked for

    def __init__(self, client: Client, seq: int, kind: int, label: str = ""):
        self.seq = seq
        self.kind = kind
        self.label = label  #: the command line, or the function's name
        self._client = client

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        """The Condition cf.Future's methods lock and wait on, made when first needed."""
        cond = self._made_condition
        if cond is None:
            with _MAKING_CONDITION:
                cond = self._made_condition
                if cond is None:
                    self._waiters = []
                    if type(self._done_callbacks) is tuple:
                        self._done_callbacks = []
                    cond = self._made_condition = threading.Condition()
        return cond

    def add_done_callback(self, fn: Callable[[cf.Future], object]) -> None:
        """As cf.Future's, without making the Condition of a future no one has locked yet."""
        with _MAKING_CONDITION:
            if self._made_condition is None and self._state not in _DONE_STATES:
                # A change of state without a Condition happens under this lock (see
                # _set_quietly), which runs the callbacks it finds once it is done.
                if type(self._done_callbacks) is tuple:
                    self._done_callbacks = []
                self._done_callbacks.append(fn)
                return
        super().add_done_callback(fn)

    def cancel(self) -> bool:
        """Cancel a task that has not started; False once it runs or finished.

        The dispatcher drops the task if it has not been dispatched, the executor if it has
        not started it.  A cancel that crosses the task's start on the wire (the future was
        not yet marked running) returns True, and the task may still run: its result is
        discarded.  Calling it again is harmless.
        """
        if self._cancel_once():
            self._client._cancel(self.seq)
            return True
        return self.cancelled()

    def cancel_here(self) -> bool:
        """Mark the future cancelled, telling no one (a task that was never sent)."""
        return self._cancel_once() or self.cancelled()

    def mark_running(self) -> bool:
        """The task started: mark the future running, unless it is cancelled or done."""
        if self._made_condition is None:
            with _MAKING_CONDITION:  # no Condition: nobody waits (see _set_quietly)
                if self._made_condition is None:
                    if self._state != _PENDING_STATE:
                        return False
                    self._state = _RUNNING_STATE
                    return True
        with self._condition:  # set_running_or_notify_cancel() on a pending future, inlined
            if self._state != _PENDING_STATE:
                return False
            self._state = _RUNNING_STATE
            return True

    @staticmethod
    def mark_all_running(futures: Iterable[TaskFuture]) -> None:
        """mark_running() for many (a Started message), taking the lock once for those
        without a Condition."""
        made = []
        with _MAKING_CONDITION:
            for fut in futures:
                if fut._made_condition is not None:
                    made.append(fut)
                elif fut._state == _PENDING_STATE:
                    fut._state = _RUNNING_STATE
        for fut in made:
            fut.mark_running()

    # State reads and changes without making the Condition.  Every waiter (result(),
    # exception(), wait(), as_completed()) makes it before it waits, and a Condition is
    # only made under _MAKING_CONDITION: while there is none, a change of state under that
    # lock has nobody to wake.  Most futures finish before anyone waits on them, and the
    # Condition costs about 1 KB and microseconds to make.

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def running(self) -> bool:
        return self._state == _RUNNING_STATE

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED_STATE:  # settled: as the standard library returns it
            exc = self._exception
            if exc is not None:
                raise exc
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED_STATE:
            return self._exception
        return super().exception(timeout)

    def set_result(self, result: Any) -> None:
        if self._made_condition is not None or not self._set_quietly(_FINISHED_STATE, result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if self._made_condition is not None or not self._set_quietly(_FINISHED_STATE, None, exception):
            super().set_exception(exception)

    def _set_quietly(self, state: str, result: Any, exception: BaseException | None) -> bool:
        """Finish a future no one has a Condition of (so no one waits); False when one was
        made meanwhile, or the future is done already: the standard way then does it (and
        raises InvalidStateError for a done one)."""
        with _MAKING_CONDITION:
            if self._made_condition is not None or self._state in _DONE_STATES:
                return False
            self._result, self._exception, self._state = result, exception, state
            callbacks = self._done_callbacks
        if callbacks:
            self._invoke_callbacks()
        return True

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
        if not fut.cancel_here():  # it was reported running: it can no longer be cancelled
            fut.set_exception(cf.CancelledError(r.reason or "cancelled"))
        return
    try:
        if fut.kind == p.TaskKind.COMMAND:
            if not r.output:
                raise TaskError(r.reason, executor=r.executor, attempts=r.attempts)
            code, out, err, truncated = tasks.decode_command_output(r.output)
            fut.set_result(tasks.CommandResult(
                code, out, err, truncated, r.executor, r.attempts,
                {"submitted": r.submitted, "started": r.started, "finished": r.finished},
                r.reason, dict(fut.outputs)))
        elif not r.output:
            raise TaskError(r.reason, executor=r.executor, attempts=r.attempts)
        else:
            fut.set_result(tasks.decode_python_output(r.output))
    except BaseException as exc:
        fut.set_exception(exc)


def results_in_order(futures: list[TaskFuture], timeout: float | None,
                     clock: Callable[[], float] = time.monotonic) -> Iterator[Any]:
    """The futures' values in order, as Executor.map gives them.

    As the standard library's: the timeout counts from this call, each future is dropped
    once its value is yielded (so the iterator keeps no result alive), and the rest are
    cancelled when the caller stops early or a result raises.  Takes ownership of the list.
    """
    deadline = None if timeout is None else clock() + timeout
    futures.reverse()  # popped from the end, in submission order
    return _in_order(futures, deadline, clock)


def _in_order(futures: list[TaskFuture], deadline: float | None, clock: Callable[[], float]) -> Iterator[Any]:
    try:
        while futures:
            # The popped future lives only in this call: nothing here holds it after the yield.
            yield _result_or_cancel(futures.pop(), None if deadline is None else max(0.0, deadline - clock()))
    finally:
        for fut in futures:
            fut.cancel()


def _result_or_cancel(fut: TaskFuture, timeout: float | None) -> Any:
    try:
        return fut.result(timeout)
    finally:
        fut.cancel()  # a no-op once it is done; a timeout cancels it


class FuturesExecutor(cf.Executor):
    """A concurrent.futures.Executor whose calls run on a falconet Client's executors.

    It behaves as the standard library's executors: futures run once an executor starts
    them, ``map`` submits every call at once, ``shutdown(wait=True)`` waits for every call
    made through it (``map``'s too, iterated or not), and ``cancel_futures`` cancels only
    those not started.  ``max_workers`` (and ``_max_workers``, which Dask reads) is the
    number of slots the dispatcher's executors have now.  Leaving a ``with`` block shuts it
    down and waits; the client stays open.

    Not an executor process (that is `falconet executor`): the name says which kind it is.
    """

    def __init__(self, client: Client):
        self._client = client
        self._futures: weakref.WeakSet[TaskFuture] = weakref.WeakSet()  # done ones fall out
        self._lock = threading.Lock()
        self._shutdown = False

    @property
    def max_workers(self) -> int:
        """Slots of the executors connected now (at least 1), refreshed at most once a second."""
        return self._client.slots()

    _max_workers = max_workers  # the name ThreadPoolExecutor uses, and engines such as Dask read

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Run fn(*args, **kwargs) through the client."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            fut = self._client.submit(fn, *args, **kwargs)
            self._futures.add(fut)
        return fut

    def map(self, fn: Callable[..., Any], *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Submit every call now; yield the results in order (see :func:`results_in_order`)."""
        deadline_from = time.monotonic()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            futures = self._client.map_futures(fn, *iterables)
            self._futures.update(futures)
        left = None if timeout is None else timeout - (time.monotonic() - deadline_from)
        return results_in_order(futures, left)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; cancel_futures cancels those not started; wait waits for the rest."""
        with self._lock:
            self._shutdown = True
            futures = list(self._futures)
        if cancel_futures:
            for f in futures:
                f.cancel()
        if wait:
            cf.wait(futures)


#: The old name of FuturesExecutor, kept for one release (it read like the executor process).
FalconetExecutor = FuturesExecutor
