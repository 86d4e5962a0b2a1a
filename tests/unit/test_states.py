"""The dispatcher's state machines (tasks, executors): the tables of legal transitions and
the functions that apply them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import protocol as p
from falconet.dispatcher import states
from falconet.dispatcher.core import Config, Core
from falconet.dispatcher.entries import ExecutorEntry, ExecutorState
from falconet.dispatcher.states import EXECUTOR_TRANSITIONS, TRANSITIONS
from falconet.errors import IllegalTransition
from falconet.protocol import FINAL_STATES, TaskState

P, D, R = TaskState.PENDING, TaskState.DISPATCHED, TaskState.RUNNING
DONE, FAILED, CANCELLED = TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED


def test_table_covers_every_state_and_only_states():
    assert set(TRANSITIONS) == set(TaskState)
    for targets in TRANSITIONS.values():
        assert targets <= set(TaskState)


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
def test_final_states_have_no_exits(final):
    assert TRANSITIONS[final] == frozenset()
    for new in TaskState:
        with pytest.raises(IllegalTransition):
            states.check(final, new)


def test_the_states_that_end_any_way_are_those_an_executor_holds():
    assert {int(D), int(R)} == states.ENDS_ANY_WAY
    for old in states.ENDS_ANY_WAY:
        for end in FINAL_STATES:
            states.check(old, end)


def test_no_state_moves_to_itself():
    for s in TaskState:
        assert s not in TRANSITIONS[s]


def test_every_live_state_can_reach_an_end():
    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for s in (P, D, R):
        assert reachable(s) >= {DONE, FAILED}, s
    assert reachable(P) == set(TaskState), "some state can never be entered from PENDING"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (P, D),  # dispatched
        (D, R),  # reported started
        (R, DONE),
        (R, FAILED),
        (D, DONE),  # start and end reported in one batch
        (D, P),  # executor lost or handed it back
        (R, P),  # executor lost while running
        (P, CANCELLED),  # cancelled while queued
        (D, CANCELLED),  # executor dropped it before starting
        (R, CANCELLED),  # executor stopped it while it ran
        (P, FAILED),  # invalid, or lost past the retry limit
    ],
)
def test_legal_moves_pass(old, new):
    states.check(old, new)
    states.check(int(old), int(new))  # the core passes plain ints


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (P, R),  # cannot run what was never sent
        (P, DONE),
        (P, P),
        (R, D),
        (DONE, P),
        (FAILED, DONE),
        (CANCELLED, D),
    ],
)
def test_illegal_moves_raise_naming_both_states(old, new):
    with pytest.raises(IllegalTransition) as info:
        states.check(old, new)
    assert old.name in str(info.value) and new.name in str(info.value)
    with pytest.raises(IllegalTransition):
        states.check(int(old), int(new))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TaskState), st.sampled_from(TaskState))
def test_check_agrees_with_the_table(old, new):
    if new in TRANSITIONS[old]:
        states.check(old, new)
    else:
        with pytest.raises(IllegalTransition):
            states.check(old, new)



# ---------------------------------------------------------------- executors

ACTIVE, DRAINING, GONE = ExecutorState.ACTIVE, ExecutorState.DRAINING, ExecutorState.GONE


def _entry(state: ExecutorState = ACTIVE) -> ExecutorEntry:
    info = p.Register(p.PROTOCOL_VERSION, "ex-1", "host-1", [], 2, 4096, "linux-x86_64", 2, 1, {}, [])
    ex = ExecutorEntry(b"ex-1", info, 0.0, 0.0)
    ex.state = state
    return ex


def test_executor_table_covers_every_state_and_only_states():
    assert set(EXECUTOR_TRANSITIONS) == set(ExecutorState)
    for targets in EXECUTOR_TRANSITIONS.values():
        assert targets <= set(ExecutorState)
        assert GONE in targets or targets == frozenset()


def test_a_gone_executor_never_comes_back():
    assert EXECUTOR_TRANSITIONS[GONE] == frozenset()
    for new in (ACTIVE, DRAINING):
        with pytest.raises(IllegalTransition) as info:
            states.move_executor(_entry(GONE), new)
        assert "GONE" in str(info.value) and new.name in str(info.value) and "ex-1" in str(info.value)


@pytest.mark.parametrize(("old", "new"), [(ACTIVE, DRAINING), (DRAINING, ACTIVE), (ACTIVE, GONE), (DRAINING, GONE)])
def test_legal_executor_moves_change_the_state(old, new):
    ex = _entry(old)
    assert states.move_executor(ex, new) is True
    assert ex.state is new


@pytest.mark.parametrize("state", list(ExecutorState))
def test_staying_put_is_not_a_move(state):
    ex = _entry(state)
    assert states.move_executor(ex, state) is False
    assert ex.state is state


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(ExecutorState), st.sampled_from(ExecutorState))
def test_move_executor_agrees_with_the_table(old, new):
    ex = _entry(old)
    if old is new or new in EXECUTOR_TRANSITIONS[old]:
        states.move_executor(ex, new)
        assert ex.state is new
    else:
        with pytest.raises(IllegalTransition):
            states.move_executor(ex, new)
        assert ex.state is old


def test_the_core_moves_an_executor_through_its_life():
    core = Core(Config())
    info = _entry().info
    core.on_executor(b"ex-1", info, 0.0)
    ex = core.executors[b"ex-1"]
    assert ex.state is ACTIVE
    core.on_client(b"c1", p.Hello(p.PROTOCOL_VERSION, "c1", "prov"), 0.0)
    core.on_client(b"c1", p.Release(["ex-1"], "idle"), 0.0)
    assert ex.state is DRAINING
    core.on_executor(b"ex-1", p.Drain([]), 0.0)  # a second Drain: staying put
    core.on_executor(b"ex-1", info, 1.0)  # reconnected: registered again
    assert ex.state is ACTIVE
    core.on_executor(b"ex-1", p.Bye(), 2.0)
    assert ex.state is GONE and b"ex-1" not in core.executors
