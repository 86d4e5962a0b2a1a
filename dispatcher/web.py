"""The dispatcher's read-only HTTP side: Prometheus metrics, the live dashboard, JSON status.

It runs in a thread of its own (an asyncio loop), never on the dispatcher's event loop,
and serves only what the loop published (:class:`.observe.Snapshot`): nothing on HTTP can
submit, cancel or change anything, and only GET and HEAD are answered.

Hostile or slow clients are bounded: at most :data:`MAX_CONNECTIONS` at once (more get a
503 and are closed), a request head of at most :data:`HEAD_BYTES` (431), sent within
:data:`HEAD_TIMEOUT_S` (else the connection is closed: a slowloris client is cut off), and an idle keep-alive
connection is closed after :data:`IDLE_S`.

Routes: ``/`` (the dashboard), ``/static/NAME``, ``/metrics``, ``/api/status``,
``/api/dashboard``.  With a token every request but the page's static files needs
``Authorization: Bearer TOKEN`` or ``?token=TOKEN``; anything but loopback needs a token
or ``insecure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from falconet.dispatcher.observe import Histogram, Observer
from falconet.errors import BindRefused

log = logging.getLogger("falconet.dispatcher")

MAX_CONNECTIONS = 512
HEAD_BYTES = 16 << 10
HEAD_TIMEOUT_S = 5.0
IDLE_S = 15.0
WRITE_TIMEOUT_S = 10.0
STATIC = Path(__file__).with_name("static")
_STATIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}
_TOKEN_PAGE = b"""<!doctype html><meta charset="utf-8"><title>falconet: token needed</title>
<style>body{font:15px system-ui,sans-serif;margin:3em}</style>
<h1>This dashboard needs its token</h1>
<p>The dispatcher was started with <code>--http-token</code>. Enter it (it is kept in this page only):</p>
<form method="get" action="/"><input name="token" type="password" autofocus size="40" data-field="token-input">
<button>Open</button></form>
"""


@dataclasses.dataclass(frozen=True)
class WebOptions:
    """Where the HTTP side listens and who may read it."""

    host: str = "127.0.0.1"
    port: int = 0  #: 0: a free port
    token: str = ""  #: required on every request when set
    insecure: bool = False  #: allow a non-loopback address without a token


class WebServer:
    """Serves an Observer's snapshots over HTTP from a thread; stop() ends it."""

    def __init__(self, observer: Observer, opts: WebOptions):
        from falconet.dispatcher.server import is_loopback

        if not is_loopback(opts.host) and not opts.token and not opts.insecure:
            raise BindRefused(f"refusing to serve HTTP on {opts.host} without a token: pass --http-token "
                              "TOKEN (readers send it as a bearer token), keep the default 127.0.0.1, or "
                              "pass --insecure if the network is trusted")
        self.observer, self.token = observer, opts.token.encode()
        family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
        try:
            self.sock = socket.create_server((opts.host.strip("[]"), opts.port), family=family, backlog=256)
        except OSError as exc:
            raise BindRefused(f"cannot serve HTTP on {opts.host}:{opts.port}: {exc.strerror or exc}; "
                              "choose another --http-port (0: any free port)") from None
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}"
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(observer))
        self.connections = 0
        self.refused = 0  #: connections closed at once: too many open
        self._cache: tuple[object, bytes] = (None, b"")
        self._metrics_cache: tuple[object, bytes] = (None, b"")
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="falconet-http", daemon=True)
        self.thread.start()
        self._ready.wait(10.0)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, sock=self.sock, limit=HEAD_BYTES))
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        def _close() -> None:
            self._server.close()
            self.loop.stop()
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(_close)
            self.thread.join(timeout=5.0)
        with contextlib.suppress(OSError):
            self.sock.close()

    # ------------------------------------------------------------ connections

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            self.refused += 1
            writer.write(_response(503, b"too many connections\n", "text/plain", close=True))
            with contextlib.suppress(Exception):
                writer.close()
            return
        self.connections += 1
        try:
            timeout = HEAD_TIMEOUT_S
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                except asyncio.LimitOverrunError:
                    await self._send(writer, _response(431, b"request head too large\n", "text/plain", close=True))
                    return
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                body, keep = self._answer(head)
                await self._send(writer, body)
                if not keep:
                    return
                timeout = IDLE_S
        finally:
            self.connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)

    def _answer(self, head: bytes) -> tuple[bytes, bool]:
        """The whole response to one request head, and whether to keep the connection."""
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        except ValueError:
            return _response(400, b"malformed request\n", "text/plain", close=True), False
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method not in ("GET", "HEAD"):  # and its body, if any, is not read: close
            return _response(405, b"read-only: only GET and HEAD\n", "text/plain", close=True,
                             extra="Allow: GET, HEAD\r\n"), False
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            return _response(400, b"requests here have no body\n", "text/plain", close=True), False
        url = urllib.parse.urlsplit(target)
        # The page's script and style hold no data, and a browser sends no token for them.
        if self.token and not url.path.startswith("/static/") and not self._authorised(headers, url.query):
            if url.path == "/":
                return _response(401, _TOKEN_PAGE, _TYPES[".html"], close=not keep), keep
            return _response(401, b"this dispatcher's HTTP side needs its token: send 'Authorization: "
                             b"Bearer TOKEN' or ?token=TOKEN\n", "text/plain", close=not keep,
                             extra='WWW-Authenticate: Bearer realm="falconet"\r\n'), keep
        code, body, ctype = self._route(url.path)
        out = _response(code, body, ctype, close=not keep)
        if method == "HEAD":
            out = out[:out.index(b"\r\n\r\n") + 4]
        return out, keep

    def _authorised(self, headers: dict, query: str) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not given:
            given = urllib.parse.parse_qs(query).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token)

    def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, self._metrics(), CONTENT_TYPE_LATEST
        if path == "/api/status":
            snap = self.observer.snapshot
            return 200, snap.status_json if snap else b"{}", "application/json"
        if path == "/api/dashboard":
            return 200, self._dashboard(), "application/json"
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        static = path.startswith("/static/") or name == "index.html"
        if static and _STATIC_NAME.fullmatch(name) and (STATIC / name).is_file():
            return 200, (STATIC / name).read_bytes(), _TYPES.get(Path(name).suffix, "application/octet-stream")
        return 404, b"not found: try /, /metrics, /api/status or /api/dashboard\n", "text/plain"

    def _metrics(self) -> bytes:
        """/metrics, rendered once per snapshot (about a second): scrapes in between, however
        many, cost the dispatcher's process nothing but the copy."""
        snap = self.observer.snapshot
        if snap is None or self._metrics_cache[0] is not snap:
            self._metrics_cache = (snap, generate_latest(self.registry))
        return self._metrics_cache[1]

    def _dashboard(self) -> bytes:
        """/api/dashboard, encoded once per snapshot and observer update (many pages poll it)."""
        obs = self.observer
        key = (obs.snapshot, obs.recorded)
        if self._cache[0] != key:
            data = obs.dashboard()
            status = obs.snapshot.status_json if obs.snapshot else b"{}"
            data.pop("status")
            body = json.dumps(data, default=str).encode()
            self._cache = (key, b'{"status": ' + status + b", " + body[1:])
        return self._cache[1]


def _response(code: int, body: bytes, ctype: str, *, close: bool, extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            "Content-Security-Policy: default-src 'self'; img-src 'self' data:\r\n"
            f"{extra}{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
    return head.encode() + body


class _Collector:
    """Prometheus metrics read from the latest snapshot at scrape time (docs/observing.md)."""

    def __init__(self, observer: Observer):
        self.observer = observer

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        obs = self.observer
        snap = obs.snapshot
        if snap is None:
            return
        s, tasks = snap.status, snap.status.get("tasks", {})
        yield CounterMetricFamily("falconet_tasks_submitted", "Tasks accepted from clients.",
                                  value=s.get("submitted_total", 0))
        c = CounterMetricFamily("falconet_tasks_finished", "Tasks that reached a final state.", labels=["outcome"])
        for outcome in ("done", "failed", "cancelled"):
            c.add_metric([outcome], tasks.get(outcome, 0))
        yield c
        g = GaugeMetricFamily("falconet_tasks", "Live tasks: queued, handed to an executor (dispatched), "
                              "started on a slot (running).", labels=["state"])
        for label, key in (("queued", "pending"), ("dispatched", "dispatched"), ("running", "running")):
            g.add_metric([label], tasks.get(key, 0))
        yield g
        wait, run = obs.histograms()
        yield _histogram("falconet_task_wait_seconds", "From submission to start on a slot, per finished task.", wait)
        yield _histogram("falconet_task_run_seconds", "From start to end on its slot, per finished task.", run)
        yield _histogram("falconet_dispatcher_turn_seconds", "Duration of the dispatcher loop's turns "
                         "(each handles every waiting message).", snap.turns)
        g = GaugeMetricFamily("falconet_executors", "Registered executors by state.", labels=["state"])
        for state in ("active", "draining"):
            g.add_metric([state], snap.executors_by_state.get(state, 0))
        yield g
        slots, busy = s.get("slots", 0), min(s.get("slots", 0), tasks.get("running", 0))
        g = GaugeMetricFamily("falconet_slots", "Task slots of the registered executors: busy (running a "
                              "task) or idle.", labels=["state"])
        g.add_metric(["busy"], busy)
        g.add_metric(["idle"], max(0, slots - busy))
        yield g
        c = CounterMetricFamily("falconet_messages", "Protocol messages by port and direction.",
                                labels=["port", "direction"])
        for (port, direction), n in snap.messages.items():
            c.add_metric([port, direction], n)
        yield c
        yield GaugeMetricFamily("falconet_unschedulable_tasks", "Queued tasks no executor (connected or "
                                "launchable) can run.", value=sum(w.get("count", 0) for w in s.get("unschedulable", ())))
        yield GaugeMetricFamily("falconet_journal_bytes", "Size of the journal (0 without --state-dir).",
                                value=(s.get("journal") or {}).get("journal_bytes", 0))
        yield GaugeMetricFamily("falconet_clients", "Clients known to the dispatcher.", value=s.get("clients", 0))
        yield GaugeMetricFamily("falconet_unacknowledged_results", "Results sent and not yet acknowledged.",
                                value=s.get("unacknowledged_results", 0))
        yield CounterMetricFamily("falconet_executors_lost", "Executors declared lost.", value=s.get("lost_executors", 0))
        yield CounterMetricFamily("falconet_events_dropped", "Events the observer could not keep up with.",
                                  value=obs.dropped)
        yield GaugeMetricFamily("falconet_snapshot_age_seconds", "How old the figures served here are.",
                                value=max(0.0, time.time() - snap.at))
        yield from _fleet(s.get("fleet"))


def _fleet(fleet: dict | None):  # noqa: ANN202
    g = GaugeMetricFamily("falconet_fleet_nodes", "The provisioner's nodes by state.", labels=["state"])
    for state, n in ((fleet or {}).get("counts") or {}).items():
        g.add_metric([state], n)
    yield g
    yield GaugeMetricFamily("falconet_fleet_spend_usd", "What the provisioner's fleet has cost so far.",
                            value=(fleet or {}).get("spent_usd", 0.0))
    yield GaugeMetricFamily("falconet_fleet_budget_usd", "The provisioner's spending cap (0: none).",
                            value=(fleet or {}).get("budget_usd", 0.0))


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.sum)
