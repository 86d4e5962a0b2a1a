"""falconet.link: monitor events, as libzmq 4.3 reports them, explain a silent dispatcher."""

from __future__ import annotations

import pytest
import zmq

from falconet.link import ZAP_REFUSED, Link, LinkState, explain

DELAYED, CONNECTED, RETRIED = zmq.EVENT_CONNECT_DELAYED, zmq.EVENT_CONNECTED, zmq.EVENT_CONNECT_RETRIED
OK, NO_DETAIL, AUTH = (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                       zmq.EVENT_HANDSHAKE_FAILED_AUTH)
PROTOCOL, DISCONNECTED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_DISCONNECTED

# Sequences recorded from a DEALER against a dispatcher (the unwatched events left out).
NOTHING_LISTENING = [(DELAYED, 115), (RETRIED, 141), (DELAYED, 115), (RETRIED, 186)]
NO_SUCH_HOST = [(RETRIED, 100), (RETRIED, 200)]
NO_KEYS_AGAINST_KEYS = [(DELAYED, 115), (CONNECTED, 13), (NO_DETAIL, 32), (DISCONNECTED, 13),
                        (RETRIED, 183), (DELAYED, 115), (CONNECTED, 13), (NO_DETAIL, 32)]
KEYS_AGAINST_NONE = [(DELAYED, 115), (CONNECTED, 14), (PROTOCOL, 0x11000003)]
UNAUTHORISED_KEY = [(DELAYED, 115), (CONNECTED, 13), (AUTH, ZAP_REFUSED), (DISCONNECTED, 13)]
ALL_GOOD = [(DELAYED, 115), (CONNECTED, 13), (OK, 0)]


def feed(events) -> LinkState:
    state = LinkState()
    for event, value in events:
        state.on_event(event, value)
    return state


@pytest.mark.parametrize(("events", "want", "hopeless"), [
    ([], Link.UNKNOWN, False),
    (NOTHING_LISTENING, Link.NO_LISTENER, False),
    (NO_SUCH_HOST, Link.NO_LISTENER, False),
    (NO_KEYS_AGAINST_KEYS, Link.HANDSHAKE_FAILED, True),
    (NO_KEYS_AGAINST_KEYS[:4], Link.HANDSHAKE_FAILED, False),  # once may be a dispatcher dying mid-way
    (KEYS_AGAINST_NONE, Link.HANDSHAKE_FAILED, True),  # a protocol error: libzmq stops trying
    (UNAUTHORISED_KEY, Link.KEY_REFUSED, True),
    (ALL_GOOD, Link.UP, False),
    (ALL_GOOD + [(DISCONNECTED, 13), *NOTHING_LISTENING], Link.NO_LISTENER, False),  # it went away
    (NO_KEYS_AGAINST_KEYS + ALL_GOOD + [(NO_DETAIL, 32)], Link.HANDSHAKE_FAILED, False),
])
def test_the_last_attempt_decides_the_state(events, want, hopeless):
    state = feed(events)
    assert state.state is want
    assert state.hopeless is hopeless


def test_a_retry_after_a_connected_attempt_keeps_what_the_handshake_said():
    assert feed(UNAUTHORISED_KEY + [(RETRIED, 100)]).state is Link.KEY_REFUSED


@pytest.mark.parametrize(("events", "stopped"), [
    (UNAUTHORISED_KEY, True),
    (KEYS_AGAINST_NONE, True),
    (NO_KEYS_AGAINST_KEYS, False),  # a broken connection: libzmq tries again
    (UNAUTHORISED_KEY + [(DELAYED, 115)], False),  # connected again by the caller
])
def test_stopped_says_whether_libzmq_tries_again(events, stopped):
    assert feed(events).stopped is stopped


@pytest.mark.parametrize(("state", "keyed", "words"), [
    (Link.NO_LISTENER, False, ["nothing accepts connections there", "'client:' line"]),
    (Link.HANDSHAKE_FAILED, False, ["probably started with --keys", "--dispatcher-key", "--key",
                                    "client.key_secret"]),
    (Link.HANDSHAKE_FAILED, True, ["is --dispatcher-key this dispatcher's dispatcher.key"]),
    (Link.KEY_REFUSED, True, ["refused this client's key", "authorized/clients",
                              "falconet keys add DIR client NAME"]),
    (Link.UP, False, ["connected, but nothing answered"]),
    (Link.UNKNOWN, False, ["is the dispatcher running", "--keys", "--dispatcher-key and --key"]),
    (Link.UNKNOWN, True, ["are the keys right"]),
])
def test_every_state_is_explained_in_one_line(state, keyed, words):
    text = explain(state, "client", keyed)
    assert "\n" not in text
    for word in words:
        assert word in text


def test_an_executor_is_told_about_its_own_port_and_folder():
    text = explain(Link.KEY_REFUSED, "executor", True)
    assert "authorized/executors" in text and "'executor:' line" in text and "client" not in text
