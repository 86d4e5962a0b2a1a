"""A real IMDSv2 server on loopback, enough of EC2's instance metadata service for tests.

PUT /latest/api/token (with the TTL header) hands out a token; GETs without a valid one get
401.  Knobs for fault tests, all changeable while it runs: ``user_data`` (None: 404),
``fail_first`` (answer 503 to that many requests first), ``disabled`` (403 on the token
request, as when IMDS is switched off) and ``token_uses`` (a token expires after that
many GETs, to exercise renewal).
"""

from __future__ import annotations

import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"


class ImdsServer:
    """An IMDSv2 server on 127.0.0.1, serving from a daemon thread."""

    def __init__(self, instance_id: str = "i-0123456789abcdef0", instance_type: str = "c5.large",
                 availability_zone: str = "us-east-1a", user_data: bytes | None = None, *, port: int = 0):
        self.meta_data = {"instance-id": instance_id, "instance-type": instance_type,
                          "placement/availability-zone": availability_zone}
        self.user_data = user_data
        self.fail_first = 0
        self.disabled = False
        self.token_uses: int | None = None
        self.requests = 0
        self.port = port
        self.url = ""
        self._tokens: dict[str, int | None] = {}  # token -> GETs left (None: unlimited)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ImdsServer:
        """Bind (port 0: any free one) and serve in a daemon thread."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="imds", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = None

    def __enter__(self) -> ImdsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, method: str, path: str, headers) -> tuple[int, bytes]:
        """Status and body for one request (called from the handler threads)."""
        with self._lock:
            self.requests += 1
            if self.fail_first > 0:
                self.fail_first -= 1
                return 503, b"service unavailable"
            if method == "PUT":
                return self._put(path, headers)
            if not self._spend(headers.get(TOKEN_HEADER, "")):
                return 401, b"unauthorized"
        if path == "/latest/user-data":
            return (404, b"not found") if self.user_data is None else (200, self.user_data)
        prefix = "/latest/meta-data/"
        if path.startswith(prefix) and path[len(prefix):] in self.meta_data:
            return 200, self.meta_data[path[len(prefix):]].encode()
        return 404, b"not found"

    def _put(self, path: str, headers) -> tuple[int, bytes]:
        if path != "/latest/api/token":
            return 404, b"not found"
        if self.disabled:
            return 403, b"forbidden"
        ttl = headers.get(TTL_HEADER, "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return 400, b"missing or invalid " + TTL_HEADER.encode()
        token = secrets.token_urlsafe(32)
        self._tokens[token] = self.token_uses
        return 200, token.encode()

    def _spend(self, token: str) -> bool:
        if token not in self._tokens:
            return False
        left = self._tokens[token]
        if left is not None:
            if left <= 0:
                del self._tokens[token]
                return False
            self._tokens[token] = left - 1
        return True


def _handler(imds: ImdsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            status, body = imds.answer(self.command, self.path, self.headers)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _reply

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

    return Handler
