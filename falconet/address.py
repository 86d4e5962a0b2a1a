"""Dispatcher addresses as people write them, checked once before any socket sees them.

ZeroMQ answers a malformed endpoint with a bare ``Invalid argument``, and some mistakes
(port 0, a port past 65535, an IPv6 address on a socket without IPv6) with a connection
that never happens.  So every place that takes an address (the command line,
:class:`falconet.Client`, the executor, the provisioner, EC2 user-data) calls :func:`parse`,
whose :class:`~falconet.errors.AddressError` says in one line what is wrong and shows a
right address, built from what was written where possible.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

import zmq

from falconet.errors import AddressError

EXAMPLE_PORT = 5555
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
_DOTTED = re.compile(r"[0-9.]+")  # looks like IPv4: never looked up as a name


class Address(NamedTuple):
    """A checked tcp://HOST:PORT; host holds an IPv6 address without its brackets."""

    host: str
    port: int

    @property
    def ipv6(self) -> bool:
        """True when the host is an IPv6 address (the socket needs IPv6 switched on)."""
        return ":" in self.host

    @property
    def url(self) -> str:
        """The address as ZeroMQ takes it."""
        host = f"[{self.host}]" if self.ipv6 else self.host
        return f"tcp://{host}:{self.port}"


def parse(text: str) -> Address:
    """Check a dispatcher address; raise AddressError saying what is wrong and what is right."""
    if not text or not text.strip():
        raise AddressError("no dispatcher address given: write tcp://HOST:PORT, "
                           f"such as tcp://127.0.0.1:{EXAMPLE_PORT}")
    scheme, sep, rest = text.strip().partition("://")
    if not sep:
        scheme, rest = "", text.strip()
    host, port, why = _split(rest)
    whys = [f"falconet speaks tcp, not {scheme}"] if scheme and scheme.lower() != "tcp" else []
    whys += [why or _host_problem(host) or _port_problem(port)]
    reasons = "".join(f"{w}; " for w in whys if w)
    if reasons or not scheme:
        raise AddressError(f"{text!r} is not an address falconet can use: {reasons}"
                           f"write tcp://HOST:PORT, such as {_example(host, port)}")
    return Address(host, int(port))


def connect(sock: zmq.Socket, address: Address) -> None:
    """Connect sock to a checked address, with IPv6 switched on when its host needs it."""
    if address.ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(address.url)


_BRACKETS = "an IPv6 address goes in brackets"


def _split(rest: str) -> tuple[str, str, str]:
    """(host, port, what is wrong) from HOST:PORT, [IPV6]:PORT or HOST."""
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            return host, "", f"{_BRACKETS}, before :PORT"
        return host, after[1:], "" if _is_ip(host) else f"[{host}] is not an IPv6 address"
    host, colon, port = rest.rpartition(":")
    if not colon:
        return rest, "", ""
    if ":" not in host:
        return host, port, ""
    if _is_ip(host):
        return host, port, _BRACKETS
    if _is_ip(rest):
        return rest, "", _BRACKETS
    return host, port, f"{host!r} is not a host name or IP address"


def _host_problem(host: str) -> str:
    if not host:
        return "it has no host"
    if _is_ip(host):
        return ""
    if host == "*":
        return "'*' is for listening, not connecting: name the dispatcher's host"
    if not _HOST_NAME.fullmatch(host):
        return f"{host!r} is not a host name or IP address"
    if _DOTTED.fullmatch(host) and not _is_ip(host, ipaddress.IPv4Address):
        return f"{host} is not an IPv4 address"
    return ""


def _port_problem(port: str) -> str:
    if not port:
        return "it has no port (the dispatcher prints its two addresses when it starts)"
    if not port.isascii() or not port.isdigit():
        return f"{port!r} is not a port number"
    if not 1 <= int(port) <= 65535:
        return f"port {int(port)} is not between 1 and 65535"
    return ""


def _example(host: str, port: str) -> str:
    """A right address, from the parts of a wrong one that are usable."""
    if _host_problem(host):
        host = "127.0.0.1"
    if _port_problem(port):
        port = str(EXAMPLE_PORT)
    return Address(host, int(port)).url


def _is_ip(text: str, kind: type = ipaddress.IPv6Address) -> bool:
    """Whether text is an address of this kind (IPv6 unless told IPv4Address)."""
    try:
        kind(text)
    except ValueError:
        return False
    return True
