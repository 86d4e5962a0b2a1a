"""The task state machine: the table of legal transitions and the check that applies it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falconet.dispatcher import states
from falconet.dispatcher.states import TRANSITIONS
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

