"""Read this cloud instance's identity and user-data through EC2's metadata service (IMDSv2).

IMDSv2 is a session protocol: ``PUT /latest/api/token`` yields a token, which every ``GET``
carries in ``X-aws-ec2-metadata-token``.  The service is often not answering yet when an
instance boots, so connection errors, timeouts and 5xx are retried with backoff until a
total deadline; every other failure is final and explained in one line.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from falconet.errors import MetadataError

log = logging.getLogger(__name__)

DEFAULT_URL = "http://169.254.169.254"
TOKEN_TTL_S = 21600  #: the longest IMDS grants
_FIRST_BACKOFF_S, _MAX_BACKOFF_S, _MAX_REQUEST_S = 0.1, 2.0, 2.0
_FIELDS = (("instance_id", "/latest/meta-data/instance-id"),
           ("instance_type", "/latest/meta-data/instance-type"),
           ("availability_zone", "/latest/meta-data/placement/availability-zone"))
# An HTTP(S)_PROXY meant for the outside world must not swallow the link-local service.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Instance:
    """What the executor learns about the instance it runs on."""

    instance_id: str
    instance_type: str
    availability_zone: str
    user_data: bytes


def read_instance(base_url: str = DEFAULT_URL, timeout_s: float = 60.0) -> Instance:
    """Read the instance's id, type, zone and user-data, trying for at most timeout_s."""
    imds = _Session(base_url.rstrip("/"), timeout_s)
    values = {name: imds.get(path).decode(errors="replace").strip() for name, path in _FIELDS}
    user_data = imds.get("/latest/user-data", missing_ok=True)
    if user_data is None:
        raise MetadataError(f"instance {values['instance_id']} has no user-data: launch it with "
                            "falconet user-data (see docs/provisioner.md)")
    return Instance(**values, user_data=user_data)


class _Session:
    """One IMDSv2 conversation: a token, renewed once per GET when the service says 401."""

    def __init__(self, base: str, timeout_s: float):
        self.base, self.timeout_s = base, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.token: str | None = None

    def get(self, path: str, missing_ok: bool = False) -> bytes | None:
        """The body at path; None on 404 when missing_ok."""
        for _ in range(2):
            if self.token is None:
                self.token = self._new_token()
            status, body = self._call("GET", path, {"X-aws-ec2-metadata-token": self.token})
            if status == 401:  # expired: the next round asks for a fresh one
                self.token = None
                continue
            if status == 404 and missing_ok:
                return None
            if status != 200:
                raise MetadataError(f"instance metadata service at {self.base} answered HTTP {status} "
                                    f"to GET {path}; is --metadata-url an EC2 metadata service?")
            return body
        raise MetadataError(f"instance metadata service at {self.base} refused a fresh token for "
                            f"GET {path} (HTTP 401); is --metadata-url an EC2 metadata service?")

    def _new_token(self) -> str:
        status, body = self._call("PUT", "/latest/api/token",
                                  {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
        if status == 403:
            raise MetadataError(f"instance metadata service at {self.base} is disabled (HTTP 403 on the "
                                "token request): enable it with aws ec2 modify-instance-metadata-options "
                                "--http-endpoint enabled")
        if status != 200:
            raise MetadataError(f"instance metadata service at {self.base} answered HTTP {status} to the "
                                "IMDSv2 token request; is --metadata-url an EC2 metadata service?")
        return body.decode(errors="replace")

    def _call(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """Status and body of one request, retrying what may pass until the deadline."""
        backoff_s = _FIRST_BACKOFF_S
        while True:
            request_s = min(_MAX_REQUEST_S, max(0.01, self.deadline - time.monotonic()))
            req = urllib.request.Request(self.base + path, method=method, headers=headers)
            try:
                with _OPENER.open(req, timeout=request_s) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                with exc:
                    if exc.code < 500:
                        return exc.code, exc.read()
                failure = f"HTTP {exc.code}"
            except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
                reason = getattr(exc, "reason", exc)
                failure = str(getattr(reason, "strerror", None) or reason or type(reason).__name__).lower()
            remaining_s = self.deadline - time.monotonic()
            if remaining_s <= 0:
                raise MetadataError(
                    f"instance metadata service at {self.base} unreachable after {self.timeout_s:g}s "
                    f"({failure}): is this an EC2 instance with IMDS enabled? "
                    "use --metadata-url for another endpoint")
            log.debug("%s %s%s failed (%s); retrying in %.1fs", method, self.base, path, failure, backoff_s)
            time.sleep(min(backoff_s, remaining_s))
            backoff_s = min(2 * backoff_s, _MAX_BACKOFF_S)
