"""ZeroMQ CURVE keys for the dispatcher's two ports, and the ZAP handler that checks them.

``falconet keys init DIR`` (:func:`init`) makes this layout, in pyzmq's ZPL certificate
format (``NAME.key`` holds a public key, ``NAME.key_secret`` the pair)::

    DIR/                                   mode 0700
      dispatcher.key, dispatcher.key_secret      the dispatcher's pair
      client.key, client.key_secret              one client pair
      executor.key, executor.key_secret          one executor pair
      authorized/clients/client.key              public keys allowed on the client port
      authorized/executors/executor.key          public keys allowed on the executor port

Every ``*.key_secret`` file is mode 0600 and :func:`load_secret` refuses one that group or
others may open; public files are 0644.  The dispatcher needs its secret file and the
``authorized/`` folders; a client or an executor needs its own secret file and the
dispatcher's public ``dispatcher.key`` (or that key as 40 characters of z85 text).
:func:`add_key` makes one more pair for a role and authorizes it; dropping any ``.key``
file into an ``authorized/`` folder authorizes it too, without a restart.

Each port is its own ZAP domain, named after the role that may use it (:data:`ROLES`).
:class:`ZapHandler` lets a key in only on the port whose folder holds it, so an executor's
key cannot submit tasks and a client's key cannot fetch them.  It runs inside the caller's
poll loop (no thread) and must be bound before the server sockets bind;
:func:`server_socket` sets ``ZAP_ENFORCE_DOMAIN`` so that, without a handler, libzmq
refuses every peer instead of letting every CURVE peer in.

A peer without keys, or with another dispatcher's key, fails the handshake before any ZAP
request is made; :meth:`ZapHandler.watch` reads those failures from the server sockets'
monitors, and they count as refused too.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from falconet.errors import KeyFileError

log = logging.getLogger("falconet.keys")

ROLES = ("client", "executor")  #: the two ports, and the ZAP domain of each
DISPATCHER = "dispatcher"  #: the name of the dispatcher's own pair
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  #: where libzmq sends ZAP requests (RFC 27)
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
Z85_KEY_LEN = 40  #: a 32-byte CURVE key in z85 text

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ZAP_VERSION = b"1.0"
# Handshakes that fail before ZAP is asked.  A refused key (HANDSHAKE_FAILED_AUTH) is
# counted by the handler itself when it answers 400.
_FAILED_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_EVENTS_PER_CALL = 10_000  # a flood of connections must not hold up the loop's turn
_PROTOCOL_ERRORS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the peer has no CURVE keys (started without "
                                                "--dispatcher-key and --key?)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "the peer's keys do not fit (its --dispatcher-key is "
                                           "another dispatcher's key?)",
}


# --- the key directory ------------------------------------------------------------------


def init(directory: Path | str, *, force: bool = False) -> dict[str, Path]:
    """Make the dispatcher's, one client's and one executor's pairs, and authorize the two."""
    root = Path(directory)
    names = (DISPATCHER, *ROLES)
    if not force:
        _refuse_existing([p for name in names for p in _pair_paths(root, name)])
    for folder in (root, root / "authorized", *(authorized_dir(root, role) for role in ROLES)):
        _private_dir(folder)
    _make_pair(root, DISPATCHER, None)
    for role in ROLES:
        _make_pair(root, role, authorized_dir(root, role))
    paths = {}
    for name in names:
        paths[f"{name}_public"], paths[f"{name}_secret"] = _pair_paths(root, name)
    paths["authorized_clients"] = authorized_dir(root, "client")
    paths["authorized_executors"] = authorized_dir(root, "executor")
    return paths


def add_key(directory: Path | str, role: str, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Make one more pair NAME for ROLE in DIRECTORY and authorize its public key; (public, secret)."""
    root = Path(directory)
    _check_role(role)
    if not _NAME.fullmatch(name) or name == DISPATCHER:
        raise ValueError(f"key name {name!r} is not usable; use letters, digits, '.', '_' or '-', "
                         f"and not {DISPATCHER!r} (the dispatcher's own pair)")
    folder = authorized_dir(root, role)
    if not folder.is_dir():
        raise KeyFileError(f"no folder {folder} for authorized {role} keys; "
                           f"make the layout first with 'falconet keys init {root}'")
    public, secret = _pair_paths(root, name)
    if not force:
        _refuse_existing([public, secret])
    _make_pair(root, name, folder)
    return public, secret


def authorized_dir(directory: Path | str, role: str) -> Path:
    """The folder of public keys allowed on ROLE's port."""
    return Path(directory) / "authorized" / f"{role}s"


def _pair_paths(root: Path, name: str) -> tuple[Path, Path]:
    return root / f"{name}{PUBLIC_SUFFIX}", root / f"{name}{SECRET_SUFFIX}"


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")


def _refuse_existing(paths: list[Path]) -> None:
    for path in paths:
        if path.exists():
            raise KeyFileError(f"key file {path} already exists; pass --force to replace it "
                               "(peers holding the old key lose access) or choose another directory")


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _make_pair(root: Path, name: str, authorize_in: Path | None) -> None:
    """Write NAME's pair into ROOT (and its public key into AUTHORIZE_IN), each file atomically.

    The files are made in a private scratch folder and renamed into place, so a secret is
    never visible with pyzmq's default mode and a ZapHandler never reads half a key file.
    """
    scratch = Path(tempfile.mkdtemp(prefix=".new-key-", dir=root))
    try:
        public, secret = (Path(p) for p in zmq.auth.create_certificates(scratch, name))
        secret.chmod(0o600)
        public.chmod(0o644)
        moves = [(secret, root / secret.name), (public, root / public.name)]
        if authorize_in is not None:
            copy = scratch / f"authorized{PUBLIC_SUFFIX}"
            shutil.copyfile(public, copy)
            copy.chmod(0o644)
            moves.append((copy, authorize_in / public.name))
        for src, dst in moves:
            os.replace(src, dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- loading keys -------------------------------------------------------------------------


def load_secret(path: Path | str) -> tuple[bytes, bytes]:
    """The (public, secret) z85 keys of a ``.key_secret`` file that only its owner may open."""
    p = Path(path)
    public, secret = _read_certificate(p)
    if secret is None:
        raise KeyFileError(f"{p} holds only a public key; pass the secret file "
                           f"{p.with_suffix(SECRET_SUFFIX)} instead")
    if not _is_z85_key(secret):
        raise KeyFileError(f"the secret key in {p} is not a {Z85_KEY_LEN}-character z85 key; "
                           "make a new pair with 'falconet keys add'")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"the public and secret keys in {p} do not belong together; "
                           "make a new pair with 'falconet keys add'")
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"key file {p} is readable by others (mode {mode:04o}); run: chmod 600 {p}")
    return public, secret


def load_public(value: str | Path) -> bytes:
    """A z85 public key from a ``.key``/``.key_secret`` file, or given as 40 characters of z85."""
    if isinstance(value, Path) or _is_file(value):
        public, _ = _read_certificate(Path(value))
        return public
    key = _ascii(value)
    if _is_z85_key(key):
        return key
    if value.endswith((PUBLIC_SUFFIX, SECRET_SUFFIX)) or os.sep in value:
        _read_certificate(Path(value))  # raises, naming the missing file
    raise KeyFileError(f"{value!r} is neither a key file nor a {Z85_KEY_LEN}-character z85 public key; "
                       "pass the dispatcher's dispatcher.key file or the public-key text in it")


def secret_from_text(z85_secret: str) -> tuple[bytes, bytes]:
    """(public, secret) from a z85 secret key given as text, e.g. in EC2 user-data."""
    key = _ascii(z85_secret)
    # The message leaves the text out: it may be a real secret with a typo.
    if not _is_z85_key(key):
        raise KeyFileError(f"the secret key given is not a {Z85_KEY_LEN}-character z85 key "
                           f"({len(z85_secret.strip())} characters); copy it from the secret-key line of a .key_secret file")
    return zmq.curve_public(key), key


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise KeyFileError(f"no such key file {path}; make keys with 'falconet keys init DIR'")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except ValueError:
        raise KeyFileError(f"{path} holds no public key; expected a ZeroMQ certificate "
                           "made by 'falconet keys init'") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}; check it is a readable file") from None
    if not _is_z85_key(public):
        raise KeyFileError(f"the public key in {path} is not a {Z85_KEY_LEN}-character z85 key; "
                           "make a new pair with 'falconet keys add'")
    return public, secret


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # a NUL or an over-long name: not a path, maybe key text
        return False


def _ascii(text: str) -> bytes:
    """TEXT without surrounding blanks as bytes; b"" if it has a character no key can hold."""
    text = text.strip()
    return text.encode("ascii") if text.isascii() else b""


def _is_z85_key(key: bytes) -> bool:
    if len(key) != Z85_KEY_LEN:
        return False
    try:
        z85.decode(key)
    except (KeyError, ValueError, struct.error):  # a character outside z85, or a group past 2**32
        return False
    return True


# --- sockets ------------------------------------------------------------------------------


def server_socket(sock: zmq.Socket, secret_file_pair: tuple[bytes, bytes], domain: str) -> None:
    """Make SOCK a CURVE server in ZAP DOMAIN; call before bind."""
    public, secret = secret_file_pair
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    # Without it libzmq lets every CURVE peer in when no ZAP handler is bound.
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):
        log.warning("libzmq %s cannot enforce ZAP; keep the ZapHandler open as long as the "
                    "%s port is bound, or any CURVE peer gets in", zmq.zmq_version(), domain)


def client_socket(sock: zmq.Socket, server_public: bytes, own: tuple[bytes, bytes]) -> None:
    """Make SOCK a CURVE client of the server with public key SERVER_PUBLIC; call before connect."""
    public, secret = own
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


# --- ZAP ----------------------------------------------------------------------------------


class ZapHandler:
    """Answers ZAP requests from the caller's poll loop: a CURVE key is let in on a domain's folder."""

    LOG_EVERY_S = 1.0  #: at most one warning line this often
    SETTLE_S = 2.0  #: a folder changed this recently is re-read on every request (coarse mtimes)

    def __init__(self, ctx: zmq.Context, authorized: dict[str, Path], *, keep: int = 20,
                 clock: Callable[[], float] = time.monotonic):
        self._folders = {domain: Path(folder) for domain, folder in authorized.items()}
        for domain, folder in self._folders.items():
            if not folder.is_dir():
                raise KeyFileError(f"no folder {folder} of authorized keys for the {domain!r} port; "
                                   "make keys with 'falconet keys init DIR'")
        self._cache: dict[Path, tuple[int, frozenset[bytes]]] = {}
        self._clock = clock
        self._last_warning_s = -float("inf")
        self.held_back = 0  #: warnings not logged since the last line, by the rate limit
        self.allowed = 0
        self.refused = 0
        self.malformed = 0  #: requests not following RFC 27 (answered 500)
        self.refusals: collections.deque[dict[str, str]] = collections.deque(maxlen=keep)
        self.handshakes_failed = 0  #: of the refused: handshakes that failed before ZAP
        self.monitors: list[zmq.Socket] = []  #: readable when failed handshakes wait: poll them
        self._monitor_domains: dict[zmq.Socket, str] = {}
        self._ctx = ctx
        self.socket = ctx.socket(zmq.REP)
        self.socket.linger = 0
        try:
            self.socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            self.socket.close()
            raise zmq.ZMQError(e.errno, f"cannot bind the ZAP handler at {ZAP_ENDPOINT}: {e.strerror}; "
                                        "a context takes one ZapHandler, close the other first") from e

    def handle(self) -> None:
        """Answer every pending ZAP request without blocking."""
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._answer(frames)
            except Exception:  # loop boundary: one bad request must not stop authentication
                log.exception("ZAP request could not be judged; answering 500")
                reply = _reply(frames[1] if len(frames) > 1 else b"", b"500", "internal error")
            try:
                self.socket.send_multipart(reply)
            except zmq.ZMQError:
                log.exception("ZAP reply could not be sent")

    def watch(self, sockets: dict[str, zmq.Socket]) -> None:
        """Count the handshakes that fail on these server sockets ({domain: socket}) before
        any ZAP request: a peer without keys, or keyed for another dispatcher.  Poll
        :attr:`monitors` and call :meth:`read_monitors` when one is readable."""
        for domain, sock in sockets.items():
            endpoint = f"inproc://falconet-handshakes-{domain}-{id(self):x}"
            sock.monitor(endpoint, _FAILED_HANDSHAKE_EVENTS)
            monitor = self._ctx.socket(zmq.PAIR)
            monitor.linger = 0
            monitor.connect(endpoint)
            self.monitors.append(monitor)
            self._monitor_domains[monitor] = domain

    def read_monitors(self) -> None:
        """Count the failed handshakes reported so far, never waiting."""
        for monitor in self.monitors:
            domain = self._monitor_domains[monitor]
            for _ in range(_EVENTS_PER_CALL):
                try:
                    head, endpoint = monitor.recv_multipart(zmq.NOBLOCK)[:2]
                except zmq.Again:
                    break
                event, value = struct.unpack("=Hi", head[:6])
                self._handshake_failed(domain, endpoint.decode("utf-8", "replace"), event, value)

    def status(self) -> dict:
        """Counts and the last refusals, for the dispatcher's status."""
        return {"allowed": self.allowed, "refused": self.refused, "malformed": self.malformed,
                "handshakes_failed": self.handshakes_failed, "recent_refusals": list(self.refusals)}

    def close(self) -> None:
        """Close the ZAP socket and the monitors; server sockets then refuse every peer."""
        for monitor in self.monitors:
            monitor.close(linger=0)
        self.monitors = []
        if not self.socket.closed:
            self.socket.close(linger=0)

    def _handshake_failed(self, domain: str, endpoint: str, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            why = _PROTOCOL_ERRORS.get(value, f"ZeroMQ protocol error {value:#x}")
        else:
            why = "the connection closed during the handshake"
        self.handshakes_failed += 1
        self.refused += 1
        # The monitor names our own endpoint, not the peer's: libzmq does not say who it was.
        self.refusals.append({"domain": domain, "address": "", "key_prefix": "",
                              "why": f"handshake failed: {why}"})
        self._warn("a handshake failed on the %r port (%s): %s", domain, endpoint, why)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6 or frames[0] != _ZAP_VERSION:
            return self._malformed(frames, f"{len(frames)} frames, version {frames[0][:8]!r}" if frames
                                   else "no frames")
        _, request_id, domain_b, address_b, _identity, mechanism, *credentials = frames
        domain = domain_b.decode("utf-8", "replace")
        address = address_b.decode("utf-8", "replace")
        if mechanism == b"CURVE" and (len(credentials) != 1 or len(credentials[0]) != 32):
            return self._malformed(frames, "CURVE request without one 32-byte key")
        key = z85.encode(credentials[0]) if mechanism == b"CURVE" else b""
        why = self._why_refused(domain, mechanism, key)
        if why:
            self._refuse(domain, address, key, why)
            return _reply(request_id, b"400", why)
        self.allowed += 1
        return _reply(request_id, b"200", "OK", user_id=key)

    def _why_refused(self, domain: str, mechanism: bytes, key: bytes) -> str:
        if mechanism != b"CURVE":
            return f"mechanism {mechanism.decode('ascii', 'replace')} is not CURVE"
        if domain not in self._folders:
            return f"unknown ZAP domain {domain!r}"
        if key not in self._keys(self._folders[domain]):
            return f"key not in {self._folders[domain]}"
        return ""

    def _refuse(self, domain: str, address: str, key: bytes, why: str) -> None:
        self.refused += 1
        prefix = key[:8].decode("ascii")
        self.refusals.append({"domain": domain, "address": address, "key_prefix": prefix, "why": why})
        self._warn("refused a peer from %s on %r (key %s...): %s", address, domain, prefix, why)

    def _malformed(self, frames: list[bytes], what: str) -> list[bytes]:
        self.malformed += 1
        self._warn("malformed ZAP request (%s); answering 500", what)
        return _reply(frames[1] if len(frames) > 1 else b"", b"500", "malformed ZAP request")

    def _keys(self, folder: Path) -> frozenset[bytes]:
        try:
            mtime_ns = folder.stat().st_mtime_ns
        except OSError as e:
            self._warn("cannot read authorized keys in %s (%s); refusing its peers", folder, e)
            return frozenset()
        cached = self._cache.get(folder)
        settled = time.time_ns() - mtime_ns > self.SETTLE_S * 1e9
        if cached and cached[0] == mtime_ns and settled:
            return cached[1]
        keys = self._read_folder(folder)
        self._cache[folder] = (mtime_ns, keys)
        return keys

    def _read_folder(self, folder: Path) -> frozenset[bytes]:
        keys = set()
        for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
            if path.name.startswith("."):
                continue
            try:
                keys.add(_read_certificate(path)[0])
            except KeyFileError as e:
                self._warn("skipping authorized key: %s", e)
        return frozenset(keys)

    def _warn(self, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._last_warning_s < self.LOG_EVERY_S:
            self.held_back += 1
            return
        if self.held_back:
            msg += " (and %d more warnings held back)"
            args = (*args, self.held_back)
        self._last_warning_s = now
        self.held_back = 0
        log.warning(msg, *args)


def _reply(request_id: bytes, status: bytes, text: str, user_id: bytes = b"") -> list[bytes]:
    return [_ZAP_VERSION, request_id, status, text.encode(), user_id, b""]


# --- what a client or an executor connects with -----------------------------------------

#: Environment variables a client or executor reads when no key is passed.
ENV_DISPATCHER_KEY, ENV_KEY = "FALCONET_DISPATCHER_KEY", "FALCONET_KEY"


class Credentials:
    """The dispatcher's public key and our own pair: what a CURVE client connects with."""

    __slots__ = ("server_public", "own")

    def __init__(self, server_public: bytes, own: tuple[bytes, bytes]):
        self.server_public = server_public
        self.own = own

    def apply(self, sock: zmq.Socket) -> None:
        """Make SOCK a CURVE client of the dispatcher; call before connect."""
        client_socket(sock, self.server_public, self.own)


def credentials(dispatcher_key: str | Path | None = None, key: str | Path | None = None,
                *, secret_text: str = "") -> Credentials | None:
    """Credentials from arguments, else FALCONET_DISPATCHER_KEY and FALCONET_KEY; None if none given.

    dispatcher_key is the dispatcher's public key (a dispatcher.key file or its z85 text); key
    is our own secret file, or secret_text the z85 secret itself (EC2 user-data).  Giving one
    without the other is an error: the connection would fail without a word.
    """
    dispatcher_key = dispatcher_key or os.environ.get(ENV_DISPATCHER_KEY) or None
    key = key or os.environ.get(ENV_KEY) or None
    if dispatcher_key is None and key is None and not secret_text:
        return None
    if dispatcher_key is None:
        raise KeyFileError(f"a secret key was given but not the dispatcher's public key; pass "
                           f"--dispatcher-key DIR/dispatcher.key (or set {ENV_DISPATCHER_KEY})")
    if key is None and not secret_text:
        raise KeyFileError(f"the dispatcher's public key was given but no secret key of our own; pass "
                           f"--key DIR/client.key_secret or executor.key_secret (or set {ENV_KEY})")
    own = secret_from_text(secret_text) if secret_text else load_secret(key)
    return Credentials(load_public(dispatcher_key), own)
