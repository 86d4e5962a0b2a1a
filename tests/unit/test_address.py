"""falconet.address: every mistake is one line that says what is wrong and shows a right address."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from falconet.address import Address, parse
from falconet.errors import AddressError, FalconetError

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
names = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(lambda h: not h.replace(".", "").isdigit())
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
hosts = st.one_of(names, ipv4, ipv6)
ports = st.integers(1, 65535)


def written(host: str) -> str:
    """The host as it goes in an address (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


@pytest.mark.parametrize(("text", "want"), [
    ("tcp://127.0.0.1:5555", Address("127.0.0.1", 5555)),
    ("tcp://localhost:1", Address("localhost", 1)),
    ("tcp://node-7.cluster.internal:65535", Address("node-7.cluster.internal", 65535)),
    ("tcp://[::1]:5556", Address("::1", 5556)),
    ("  tcp://host:5555\n", Address("host", 5555)),
    ("TCP://host:5555", Address("host", 5555)),
])
def test_right_addresses_are_taken(text, want):
    assert parse(text) == want
    assert parse(text).url == want.url


@pytest.mark.parametrize(("text", "message"), [
    ("127.0.0.1:5555", "'127.0.0.1:5555' is not an address falconet can use: write tcp://HOST:PORT, "
                       "such as tcp://127.0.0.1:5555"),
    ("localhost", "'localhost' is not an address falconet can use: it has no port (the dispatcher prints "
                  "its two addresses when it starts); write tcp://HOST:PORT, such as tcp://localhost:5555"),
    ("tcp://host", "it has no port"),
    ("tcp://h:70000", "port 70000 is not between 1 and 65535; write tcp://HOST:PORT, such as tcp://h:5555"),
    ("tcp://h:0", "port 0 is not between 1 and 65535"),
    ("tcp://h:http", "'http' is not a port number"),
    ("tcp://:5555", "it has no host"),
    ("tcp://*:5555", "'*' is for listening"),
    ("tcp://a b:5555", "'a b' is not a host name or IP address"),
    ("tcp://999.1.1.1:5555", "999.1.1.1 is not an IPv4 address"),
    ("http://h:5555", "falconet speaks tcp, not http; write tcp://HOST:PORT, such as tcp://h:5555"),
    ("tcp://::1:5555", "an IPv6 address goes in brackets; write tcp://HOST:PORT, such as tcp://[::1]:5555"),
    ("fe80::1", "such as tcp://[fe80::1]:5555"),
    ("tcp://[::1", "an IPv6 address goes in brackets"),
    ("tcp://[host]:5555", "[host] is not an IPv6 address"),
    ("tcp://h:5555;x", "'5555;x' is not a port number"),
    ("", "no dispatcher address given: write tcp://HOST:PORT, such as tcp://127.0.0.1:5555"),
    ("   ", "no dispatcher address given"),
])
def test_wrong_addresses_say_what_is_wrong_and_show_a_right_one(text, message):
    with pytest.raises(AddressError) as info:
        parse(text)
    assert message in str(info.value)
    assert isinstance(info.value, FalconetError) and isinstance(info.value, ValueError)


@given(hosts, ports)
def test_every_host_and_port_round_trips(host, port):
    addr = parse(f"tcp://{written(host)}:{port}")
    assert addr == Address(host, port)
    assert parse(addr.url) == addr
    assert addr.ipv6 == (ipaddress.ip_address(host).version == 6 if ":" in host else False)


@given(hosts, ports)
def test_host_and_port_without_tcp_suggest_the_same_with_tcp(host, port):
    with pytest.raises(AddressError, match="write tcp://HOST:PORT, such as (.*)$") as info:
        parse(f"{written(host)}:{port}")
    assert str(info.value).endswith(f"such as tcp://{written(host)}:{port}")


@given(hosts, st.one_of(st.integers(65536, 10**9), st.just(0)))
def test_ports_out_of_range_keep_the_host_in_the_suggestion(host, port):
    with pytest.raises(AddressError) as info:
        parse(f"tcp://{written(host)}:{port}")
    assert f"port {port} is not between 1 and 65535" in str(info.value)
    assert str(info.value).endswith(f"such as tcp://{written(host)}:5555")


@given(st.text(max_size=60))
@example("tcp://\n:5")
@example("tcp://[]:5")
def test_any_text_is_an_address_or_one_line_saying_why_not(text):
    try:
        addr = parse(text)
    except AddressError as exc:
        message = str(exc)
        assert "\n" not in message and "write tcp://HOST:PORT, such as tcp://" in message
        suggestion = message.rsplit("such as ", 1)[1]
        assert parse(suggestion).url == suggestion, "the right address shown is itself right"
    else:
        assert parse(addr.url) == addr and not any(c.isspace() for c in addr.url)
