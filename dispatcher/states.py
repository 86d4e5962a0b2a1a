"""The dispatcher's state machines: tasks and executors, each one table of legal
transitions and the one function that applies it."""

from __future__ import annotations

from falconet.dispatcher.entries import ExecutorEntry, ExecutorState
from falconet.errors import IllegalTransition
from falconet.protocol import TaskState

P, D, R = TaskState.PENDING, TaskState.DISPATCHED, TaskState.RUNNING
DONE, FAILED, CANCELLED = TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED

#: state -> the states it may move to.  DISPATCHED may finish directly because an
#: executor may report a task's start and its end in the same batch; DISPATCHED and
#: RUNNING go back to PENDING when their executor is lost or hands them back; an executor
#: may cancel a task it runs.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    P: frozenset({D, FAILED, CANCELLED}),
    D: frozenset({R, P, DONE, FAILED, CANCELLED}),
    R: frozenset({P, DONE, FAILED, CANCELLED}),
    DONE: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

# Plain ints make the hot-path check a set lookup on ints rather than on enum members.
_ALLOWED = {int(s): frozenset(int(t) for t in ts) for s, ts in TRANSITIONS.items()}
#: (old, new) pairs of the table, for callers that check inline on their hot path
LEGAL = frozenset((old, new) for old, news in _ALLOWED.items() for new in news)
#: states from which every final state is legal (a task an executor holds is in one): a batch
#: of results for tasks all in these states needs no check pair by pair
ENDS_ANY_WAY = frozenset(old for old, news in _ALLOWED.items()
                         if {int(DONE), int(FAILED), int(CANCELLED)} <= news)


def check(old: int, new: int) -> None:
    """Raise IllegalTransition unless old -> new is in the table."""
    if new not in _ALLOWED[old]:
        raise IllegalTransition(f"task state {TaskState(old).name} -> {TaskState(new).name} is not allowed")


ACTIVE, DRAINING, GONE = ExecutorState.ACTIVE, ExecutorState.DRAINING, ExecutorState.GONE

#: executor state -> the states it may move to.  A draining executor that registers again
#: (it reconnected) is active again; an executor of any live state can be lost or leave.
#: Staying put is not a move: a second Drain, a Release of a draining executor and a
#: Register of an active one (a reconnect) change nothing.
EXECUTOR_TRANSITIONS: dict[ExecutorState, frozenset[ExecutorState]] = {
    ACTIVE: frozenset({DRAINING, GONE}),
    DRAINING: frozenset({ACTIVE, GONE}),
    GONE: frozenset(),
}


def move_executor(ex: ExecutorEntry, new: ExecutorState) -> bool:
    """Set ex.state to new; True if it changed.  Raise IllegalTransition unless the table
    allows the move.  The core calls this only on an executor's rare changes of life
    (register, drain, release, removal), never per task, so the check costs nothing."""
    old = ex.state
    if old is new:
        return False
    if new not in EXECUTOR_TRANSITIONS[old]:
        raise IllegalTransition(f"executor state {old.name} -> {new.name} is not allowed "
                                f"(executor {ex.info.executor_id})")
    ex.state = new
    return True
