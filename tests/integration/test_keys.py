"""CURVE keys and the ZAP handler: key files on disk, then real sockets on loopback ports.

Every socket is closed with linger=0 and every receive polls with a deadline, so a message that
never comes fails the test instead of hanging it.  The ZAP handler is pumped by the test's own
poll loop, as the dispatcher's loop pumps it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
import zmq.auth
from hypothesis import given
from hypothesis import strategies as st
from zmq.utils import z85

from falconet.errors import KeyFileError
from falconet.keys import (
    ROLES,
    ZAP_ENDPOINT,
    ZapHandler,
    add_key,
    authorized_dir,
    client_socket,
    init,
    load_public,
    load_secret,
    secret_from_text,
    server_socket,
)

WAIT_S = 2.0  # the most any expected event may take
QUIET_S = 0.3  # how long an unexpected message is given to show up
OLD_NS = 1_600_000_000 * 10**9  # a folder mtime well past ZapHandler.SETTLE_S


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the key directory --------------------------------------------------------------------


@pytest.fixture
def keydir(tmp_path: Path) -> dict[str, Path]:
    return init(tmp_path / "keys")


def test_init_makes_the_layout_with_private_modes(tmp_path: Path, keydir):
    root = tmp_path / "keys"
    assert set(keydir) == {f"{n}_{k}" for n in ("dispatcher", *ROLES) for k in ("public", "secret")} | {
        "authorized_clients", "authorized_executors"}
    assert keydir["dispatcher_secret"] == root / "dispatcher.key_secret"
    assert keydir["authorized_clients"] == root / "authorized" / "clients"
    assert mode(root) == 0o700
    for name in ("dispatcher", *ROLES):
        assert mode(keydir[f"{name}_secret"]) == 0o600
        assert mode(keydir[f"{name}_public"]) == 0o644
        public, _ = load_secret(keydir[f"{name}_secret"])
        assert load_public(keydir[f"{name}_public"]) == public
    for role in ROLES:
        authorized = sorted(p.name for p in authorized_dir(root, role).iterdir())
        assert authorized == [f"{role}.key"]
        assert (authorized_dir(root, role) / f"{role}.key").read_bytes() == keydir[f"{role}_public"].read_bytes()
    assert not list(root.glob(".new-key-*")), "scratch folders are cleaned up"


def test_init_refuses_to_overwrite_keys_unless_forced(tmp_path: Path, keydir):
    before = load_secret(keydir["dispatcher_secret"])
    with pytest.raises(KeyFileError, match=r"dispatcher\.key already exists; pass --force"):
        init(tmp_path / "keys")
    assert load_secret(keydir["dispatcher_secret"]) == before
    again = init(tmp_path / "keys", force=True)
    assert load_secret(again["dispatcher_secret"]) != before
    assert load_public(again["authorized_clients"] / "client.key") == load_public(again["client_public"])


def test_init_refuses_when_any_one_pair_file_exists(tmp_path: Path):
    (tmp_path / "executor.key_secret").write_text("left over")
    with pytest.raises(KeyFileError, match="executor.key_secret"):
        init(tmp_path)
    assert not (tmp_path / "dispatcher.key").exists(), "nothing is written when init refuses"


def test_add_key_makes_a_pair_and_authorizes_it_for_its_role_only(tmp_path: Path, keydir):
    root = tmp_path / "keys"
    public, secret = add_key(root, "executor", "worker-2")
    first = load_secret(secret)
    assert (public, secret) == (root / "worker-2.key", root / "worker-2.key_secret")
    assert (mode(public), mode(secret)) == (0o644, 0o600)
    assert load_public(authorized_dir(root, "executor") / "worker-2.key") == load_secret(secret)[0]
    assert not (authorized_dir(root, "client") / "worker-2.key").exists()
    with pytest.raises(KeyFileError, match="worker-2.key already exists"):
        add_key(root, "executor", "worker-2")
    assert load_secret(add_key(root, "executor", "worker-2", force=True)[1]) != first


@pytest.mark.parametrize("role, name, message", [
    ("dispatcher", "x", "unknown role"),
    ("client", "../x", "not usable"),
    ("client", "", "not usable"),
    ("client", "dispatcher", "dispatcher's own pair"),
])
def test_add_key_refuses_bad_roles_and_names(tmp_path: Path, keydir, role, name, message):
    with pytest.raises(ValueError, match=message):
        add_key(tmp_path / "keys", role, name)


def test_add_key_needs_an_initialised_directory(tmp_path: Path):
    with pytest.raises(KeyFileError, match="falconet keys init"):
        add_key(tmp_path, "client", "c2")


# --- loading keys -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0o644, 0o640, 0o604, 0o660])
def test_load_secret_refuses_a_file_others_may_open(keydir, bits):
    path = keydir["client_secret"]
    path.chmod(bits)
    with pytest.raises(KeyFileError) as err:
        load_secret(path)
    assert str(err.value) == f"key file {path} is readable by others (mode {bits:04o}); run: chmod 600 {path}"


def test_load_secret_accepts_an_owner_only_file(keydir):
    keydir["client_secret"].chmod(0o400)
    public, secret = load_secret(keydir["client_secret"])
    assert zmq.curve_public(secret) == public


def test_load_secret_refuses_a_public_file(keydir):
    with pytest.raises(KeyFileError, match=r"holds only a public key; pass the secret file .*client\.key_secret"):
        load_secret(keydir["client_public"])


def test_load_secret_names_a_missing_file(tmp_path: Path):
    with pytest.raises(KeyFileError, match=r"no such key file .*nope\.key_secret; make keys with 'falconet keys init DIR'"):
        load_secret(tmp_path / "nope.key_secret")


def test_load_secret_refuses_malformed_files(keydir):
    path = keydir["client_secret"]
    path.write_text("not a certificate\n")
    with pytest.raises(KeyFileError, match="holds no public key"):
        load_secret(path)
    other_public, _ = zmq.curve_keypair()
    _, secret = zmq.curve_keypair()
    path.write_text(f'curve\n    public-key = "{other_public.decode()}"\n    secret-key = "{secret.decode()}"\n')
    with pytest.raises(KeyFileError, match="do not belong together"):
        load_secret(path)
    path.write_text(f'curve\n    public-key = "{other_public.decode()}"\n    secret-key = "short"\n')
    with pytest.raises(KeyFileError, match="not a 40-character z85 key"):
        load_secret(path)


def test_load_public_reads_files_and_text(keydir):
    public = load_secret(keydir["dispatcher_secret"])[0]
    assert load_public(keydir["dispatcher_public"]) == public
    assert load_public(str(keydir["dispatcher_public"])) == public
    assert load_public(keydir["dispatcher_secret"]) == public
    assert load_public(public.decode()) == public
    assert load_public(f"  {public.decode()}\n") == public


@pytest.mark.parametrize("text", ["", "hello", "~" * 40, "#" * 40, "a" * 39, "é" * 40])
def test_load_public_refuses_text_that_is_no_key(text):
    with pytest.raises(KeyFileError, match="neither a key file nor a 40-character z85 public key"):
        load_public(text)


def test_load_public_names_a_missing_key_file(tmp_path: Path):
    with pytest.raises(KeyFileError, match="no such key file"):
        load_public(str(tmp_path / "dispatcher.key"))


def test_secret_from_text_gives_the_pair():
    public, secret = zmq.curve_keypair()
    assert secret_from_text(secret.decode()) == (public, secret)
    assert secret_from_text(f"\n{secret.decode()} ") == (public, secret)
    with pytest.raises(KeyFileError, match=r"not a 40-character z85 key \(39 characters\)"):
        secret_from_text(secret.decode()[:-1])


@given(st.integers())
def test_secret_from_text_round_trips_any_keypair(_):
    public, secret = zmq.curve_keypair()
    assert secret_from_text(secret.decode()) == (public, secret)


@given(st.text(max_size=60))
def test_secret_from_text_refuses_garbage_without_echoing_it(text):
    try:
        public, secret = secret_from_text(text)
    except KeyFileError as e:
        if len(text.strip()) >= 8:
            assert text.strip() not in str(e)
    else:
        assert len(secret) == 40 and zmq.curve_public(secret) == public


# --- sockets and ZAP ----------------------------------------------------------------------


class Net:
    """One context whose sockets are all closed with linger=0 at the end of the test."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.handlers: list[ZapHandler] = []

    def socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.linger = 0
        self.sockets.append(s)
        return s

    def zap(self, authorized: dict[str, Path], **kw) -> ZapHandler:
        handler = ZapHandler(self.ctx, authorized, **kw)
        self.handlers.append(handler)
        return handler

    def close(self) -> None:
        for s in self.sockets:
            s.close(linger=0)
        for h in self.handlers:
            h.close()
        self.ctx.term()


@pytest.fixture
def net():
    n = Net()
    yield n
    n.close()


def authorized(keydir) -> dict[str, Path]:
    return {"client": keydir["authorized_clients"], "executor": keydir["authorized_executors"]}


def bind_server(net: Net, keydir, domain: str = "client", *, curve: bool = True) -> zmq.Socket:
    router = net.socket(zmq.ROUTER)
    if curve:
        server_socket(router, load_secret(keydir["dispatcher_secret"]), domain)
    else:
        router.zap_domain = domain.encode()
    router.bind("tcp://127.0.0.1:0")
    return router


@pytest.fixture
def server(net: Net, keydir):
    zap = net.zap(authorized(keydir))  # before the server binds, as the dispatcher must
    router = bind_server(net, keydir)
    return SimpleNamespace(zap=zap, router=router, public=load_public(keydir["dispatcher_public"]))


def dial(net: Net, router: zmq.Socket, server_public: bytes | None, own: tuple[bytes, bytes] | None) -> zmq.Socket:
    dealer = net.socket(zmq.DEALER)
    if own is not None:
        client_socket(dealer, server_public, own)
    dealer.connect(router.last_endpoint.decode())
    dealer.send(b"hello")
    return dealer


def pump(zap: ZapHandler | None, router: zmq.Socket, timeout_s: float, stop=lambda: False):
    """Answer ZAP requests until ROUTER gets a message (returned), STOP() holds, or time runs out."""
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    if zap is not None:
        poller.register(zap.socket, zmq.POLLIN)
    deadline = time.monotonic() + timeout_s
    while not stop() and (left_s := deadline - time.monotonic()) > 0:
        events = dict(poller.poll(left_s * 1000))
        if zap is not None and zap.socket in events:
            zap.handle()
        if router in events:
            return router.recv_multipart(copy=False)
    return None


def assert_refused(zap: ZapHandler, router: zmq.Socket) -> dict[str, str]:
    before = zap.refused
    assert pump(zap, router, WAIT_S, stop=lambda: zap.refused > before) is None
    assert zap.refused > before, "the ZAP handler was never asked"
    assert pump(zap, router, QUIET_S) is None
    return zap.refusals[-1]


def test_an_authorized_client_gets_through(server, net, keydir):
    own = load_secret(keydir["client_secret"])
    dial(net, server.router, server.public, own)
    msg = pump(server.zap, server.router, WAIT_S)
    assert msg is not None, "the authorized client's message never arrived"
    assert msg[-1].bytes == b"hello"
    assert msg[-1].get("User-Id") == own[0].decode()
    assert (server.zap.allowed, server.zap.refused) == (1, 0)


def test_an_unknown_key_never_gets_through(server, net):
    dial(net, server.router, server.public, zmq.curve_keypair())
    refusal = assert_refused(server.zap, server.router)
    assert refusal["domain"] == "client" and refusal["address"] == "127.0.0.1"
    assert "key not in" in refusal["why"] and len(refusal["key_prefix"]) == 8
    assert server.zap.allowed == 0


def test_an_executor_key_is_refused_on_the_client_port(server, net, keydir):
    dial(net, server.router, server.public, load_secret(keydir["executor_secret"]))
    assert str(keydir["authorized_clients"]) in assert_refused(server.zap, server.router)["why"]


def test_a_client_key_is_refused_on_the_executor_port(net, keydir):
    zap = net.zap(authorized(keydir))
    router = bind_server(net, keydir, "executor")
    dial(net, router, load_public(keydir["dispatcher_public"]), load_secret(keydir["client_secret"]))
    assert_refused(zap, router)
    dial(net, router, load_public(keydir["dispatcher_public"]), load_secret(keydir["executor_secret"]))
    assert pump(zap, router, WAIT_S) is not None


def test_a_plain_client_never_gets_through_a_curve_port(server, net):
    dial(net, server.router, None, None)
    assert pump(server.zap, server.router, QUIET_S) is None


def test_the_null_mechanism_is_refused_by_the_handler(net, keydir):
    zap = net.zap(authorized(keydir))
    router = bind_server(net, keydir, curve=False)  # a port that asks ZAP about NULL peers
    dial(net, router, None, None)
    assert "mechanism NULL is not CURVE" in assert_refused(zap, router)["why"]


def test_an_unknown_domain_is_refused(net, keydir):
    zap = net.zap(authorized(keydir))
    router = bind_server(net, keydir, "admin")
    dial(net, router, load_public(keydir["dispatcher_public"]), load_secret(keydir["client_secret"]))
    assert "unknown ZAP domain 'admin'" in assert_refused(zap, router)["why"]


def test_a_key_added_after_start_is_let_in_on_its_next_connection(server, net, tmp_path: Path, keydir):
    spare = tmp_path / "spare"
    spare.mkdir()
    public_file, secret_file = zmq.auth.create_certificates(spare, "late")
    own = zmq.auth.load_certificate(secret_file)
    first = dial(net, server.router, server.public, own)
    assert_refused(server.zap, server.router)
    first.close(linger=0)
    shutil.copyfile(public_file, keydir["authorized_clients"] / "late.key")
    dial(net, server.router, server.public, own)
    assert pump(server.zap, server.router, WAIT_S) is not None, "the newly authorized key was refused"


def test_a_server_without_a_handler_refuses_everyone(net, keydir):
    router = bind_server(net, keydir)
    dial(net, router, load_public(keydir["dispatcher_public"]), load_secret(keydir["client_secret"]))
    assert pump(None, router, QUIET_S) is None


# --- the handler spoken to directly -------------------------------------------------------


def ask(net: Net, zap: ZapHandler, frames: list[bytes]) -> list[bytes]:
    """Send FRAMES to the handler from a raw REQ socket and return its reply."""
    req = net.socket(zmq.REQ)
    req.connect(ZAP_ENDPOINT)
    req.send_multipart(frames)
    assert zap.socket.poll(WAIT_S * 1000), "the request never reached the handler"
    zap.handle()
    assert req.poll(WAIT_S * 1000), "the handler did not reply"
    return req.recv_multipart()


def curve_request(domain: str, public: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"42", domain.encode(), b"192.0.2.9", b"", mechanism, z85.decode(public)]


@pytest.fixture
def zap(net: Net, keydir) -> ZapHandler:
    return net.zap(authorized(keydir))


def test_the_reply_carries_the_key_as_user_id(net, zap, keydir):
    public = load_public(keydir["client_public"])
    assert ask(net, zap, curve_request("client", public)) == [b"1.0", b"42", b"200", b"OK", public, b""]
    assert ask(net, zap, curve_request("executor", public))[2:4] == [b"400", f"key not in {keydir['authorized_executors']}".encode()]


@pytest.mark.parametrize("frames", [
    [b"garbage"],
    [b""],
    [b"1.0", b"1"],
    [b"2.0", b"1", b"client", b"127.0.0.1", b"", b"CURVE", b"k" * 32],
    [b"1.0", b"1", b"client", b"127.0.0.1", b"", b"CURVE", b"short"],
    [b"1.0", b"1", b"client", b"127.0.0.1", b"", b"CURVE"],
    [b"1.0", b"1", b"\xff\xfe", b"\xff", b"", b"CURVE", b"k" * 32, b"extra"],
])
def test_garbage_gets_500_and_the_handler_keeps_going(net, zap, keydir, frames):
    reply = ask(net, zap, frames)
    assert reply[0] == b"1.0" and reply[2] == b"500"
    assert zap.malformed == 1
    public = load_public(keydir["client_public"])
    assert ask(net, zap, curve_request("client", public))[2] == b"200"


def test_non_curve_mechanisms_are_refused(net, zap, keydir):
    public = load_public(keydir["client_public"])
    for mechanism in (b"NULL", b"PLAIN", b"GSSAPI"):
        reply = ask(net, zap, [b"1.0", b"7", b"client", b"127.0.0.1", b"", mechanism, b"user", b"pass"])
        assert reply[2] == b"400", mechanism
    assert ask(net, zap, curve_request("client", public, b"PLAIN"))[2] == b"400"
    assert (zap.allowed, zap.refused, zap.malformed) == (0, 4, 0)


def test_a_folder_is_reread_only_when_its_mtime_changes(net, zap, keydir):
    folder = keydir["authorized_clients"]
    os.utime(folder, ns=(OLD_NS, OLD_NS))
    public_file, _ = zmq.auth.create_certificates(keydir["authorized_executors"].parent, "late")
    public = load_public(public_file)
    assert ask(net, zap, curve_request("client", public))[2] == b"400"
    shutil.copyfile(public_file, folder / "late.key")
    os.utime(folder, ns=(OLD_NS, OLD_NS))
    assert ask(net, zap, curve_request("client", public))[2] == b"400", "the cached keys were not used"
    os.utime(folder, ns=(OLD_NS + 1, OLD_NS + 1))
    assert ask(net, zap, curve_request("client", public))[2] == b"200"


def test_a_malformed_key_file_in_the_folder_is_skipped(net, zap, keydir):
    (keydir["authorized_clients"] / "broken.key").write_text("nonsense\n")
    assert ask(net, zap, curve_request("client", load_public(keydir["client_public"])))[2] == b"200"


def test_refusals_are_logged_at_most_once_a_second_and_kept_bounded(net, keydir, caplog):
    now = [100.0]
    zap = net.zap(authorized(keydir), keep=3, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="falconet.keys")
    for _ in range(5):
        ask(net, zap, curve_request("client", zmq.curve_keypair()[0]))
    assert len(caplog.records) == 1 and zap.held_back == 4
    now[0] += 1.5
    ask(net, zap, curve_request("client", zmq.curve_keypair()[0]))
    assert len(caplog.records) == 2 and "4 more warnings held back" in caplog.records[-1].getMessage()
    assert zap.refused == 6 and len(zap.refusals) == 3
    assert set(zap.refusals[-1]) == {"domain", "address", "key_prefix", "why"}
    assert zap.status()["refused"] == 6 and len(zap.status()["recent_refusals"]) == 3


def test_a_second_handler_on_one_context_is_refused_clearly(net, zap, keydir):
    with pytest.raises(zmq.ZMQError, match="one ZapHandler"):
        ZapHandler(net.ctx, authorized(keydir))


def test_a_missing_authorized_folder_is_refused_at_start(net, tmp_path: Path):
    with pytest.raises(KeyFileError, match="no folder .*nowhere"):
        ZapHandler(net.ctx, {"client": tmp_path / "nowhere"})
