"""Why the dispatcher is silent, read from the connecting socket's own events.

A DEALER connects in the background and fails in silence: a dispatcher that is not
running, a security handshake that failed (keys on one side only, or the wrong dispatcher
key) and a key the dispatcher refused all look the same to the caller, no answer.  libzmq
reports each of them as a monitor event, though.  :class:`LinkWatch` reads those events
without ever waiting, :class:`LinkState` keeps what the last connection attempt came to,
and :func:`explain` turns that into the clause of a one-line message.
"""

from __future__ import annotations

import enum
import struct
import uuid

import zmq

ZAP_REFUSED = 400  #: the ZAP status of a key the dispatcher's handler does not allow (RFC 27)
_EVENTS = (zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED
           | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


class Link(enum.Enum):
    """What the last connection attempt to the dispatcher came to."""

    UNKNOWN = "unknown"  #: no attempt has ended yet (or the host name is still being looked up)
    NO_LISTENER = "no listener"  #: the TCP connection failed: nothing listens there, or no route
    HANDSHAKE_FAILED = "handshake failed"  #: connected, but ZeroMQ's security handshake failed
    KEY_REFUSED = "key refused"  #: the dispatcher's key check refused our key
    UP = "up"  #: connected and through the handshake: any silence is the dispatcher's


class LinkState:
    """The state of a link, moved by monitor events (no sockets: tests feed it events)."""

    def __init__(self) -> None:
        self.state = Link.UNKNOWN
        self.handshake_failures = 0  #: in a row, since the link was last up
        self.stopped = False  #: libzmq will not try again (a refused key, a protocol error)
        self._reached = False  #: the current attempt made a TCP connection

    def on_event(self, event: int, value: int) -> Link:
        """Take one monitor event; return the state after it."""
        if event == zmq.EVENT_CONNECT_DELAYED:
            self._reached = self.stopped = False
        elif event == zmq.EVENT_CONNECTED:
            self._reached = True
        elif event == zmq.EVENT_CONNECT_RETRIED and not self._reached:
            self.state = Link.NO_LISTENER
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.state, self.handshake_failures = Link.UP, 0
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and value == ZAP_REFUSED:
            self.state, self.stopped = Link.KEY_REFUSED, True
        elif event in _HANDSHAKE_FAILED or event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.state = Link.HANDSHAKE_FAILED
            self.handshake_failures += 1
            # libzmq reconnects after a broken connection (NO_DETAIL), never after a
            # protocol or authentication error.
            self.stopped = event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        return self.state

    @property
    def hopeless(self) -> bool:
        """True when waiting longer cannot help: libzmq stopped trying, or handshakes keep failing."""
        return self.stopped or (self.state is Link.HANDSHAKE_FAILED and self.handshake_failures >= 2)


class LinkWatch(LinkState):
    """A LinkState fed by a socket's monitor; create it before the socket connects."""

    def __init__(self, sock: zmq.Socket):
        super().__init__()
        endpoint = f"inproc://falconet-link-{uuid.uuid4().hex}"
        sock.monitor(endpoint, _EVENTS)
        self._watched = sock
        self.socket = sock.context.socket(zmq.PAIR)  #: readable when events wait: poll it
        self.socket.linger = 0
        self.socket.connect(endpoint)

    def update(self) -> Link:
        """Take every event that came so far, never waiting; return the state."""
        while True:
            try:
                head, _endpoint = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return self.state
            event, value = struct.unpack("=Hi", head)
            self.on_event(event, value)

    def close(self) -> None:
        """Stop watching (before the watched socket closes)."""
        if self.socket.closed:
            return
        try:
            self._watched.disable_monitor()
        except zmq.ZMQError:
            pass  # the watched socket is gone already
        self.socket.close(linger=0)


def explain(state: Link, role: str, keyed: bool) -> str:
    """Why a peer of this role ("client" or "executor") hears nothing, as one clause."""
    line = f"the '{role}:' line falconet dispatcher printed"
    if state is Link.NO_LISTENER:
        return f"nothing accepts connections there: is the dispatcher running, and is this its {role} address ({line})?"
    if state is Link.HANDSHAKE_FAILED and not keyed:
        return ("the security handshake failed, so the dispatcher was probably started with --keys: give "
                f"--dispatcher-key (its dispatcher.key) and --key (the {role}.key_secret file)")
    if state is Link.HANDSHAKE_FAILED:
        return ("the security handshake failed: is --dispatcher-key this dispatcher's dispatcher.key, "
                "and was it started with --keys at all?")
    if state is Link.KEY_REFUSED:
        return (f"the dispatcher refused this {role}'s key: it is not in its authorized/{role}s folder "
                f"('falconet keys add DIR {role} NAME' makes one that is), or this is not its {role} "
                f"address ({line})")
    if state is Link.UP:
        return f"connected, but nothing answered: is this a falconet dispatcher's {role} address ({line})?"
    keys = "are the keys right" if keyed else "did you give --dispatcher-key and --key"
    return f"no answer: is the dispatcher running, is this its {role} address, and if it was started with --keys, {keys}?"
