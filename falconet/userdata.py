"""The user-data document that tells an executor on a cloud instance how to join.

The provisioner writes it into every instance it launches; the executor baked into the image
(``falconet executor --from-instance-metadata``) reads it back through the instance
metadata service.  It is one JSON object, documented in docs/provisioner.md::

    {"falconet": 1, "dispatcher": "tcp://10.0.1.5:5556", "cluster": "demo",
     "launch_token": "demo-3f2a9c-0007", "slots": 0, "idle_timeout_s": 600,
     "tags": {"site": "cloud"}, "shutdown_when_idle": false}

Only ``falconet`` (the format version) and ``dispatcher`` are required.  Unknown keys are
refused, so a typo fails loudly at boot instead of being silently ignored.

On a stock image without the executor baked in, the user-data is a MIME multipart
document (:func:`with_cloud_config`): a cloud-config part that installs falconet and starts
its unit (``ami/cloud-init.yaml``), and a part of type ``text/x-falconet`` holding the JSON
object above.  cloud-init ignores the second part; the executor reads only it.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import math
from dataclasses import dataclass, field
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

from falconet import address
from falconet.errors import AddressError, UserDataError

FORMAT_VERSION = 1
CONTENT_TYPE = "text/x-falconet"  #: the falconet part of a multipart user-data
MAX_BYTES = 16 * 1024  #: EC2 accepts 16 KiB of user-data


@dataclass(frozen=True)
class UserData:
    """What an executor needs to join a fleet."""

    dispatcher: str  #: the dispatcher's executor address, tcp://HOST:PORT
    cluster: str = ""  #: the provisioner's cluster name (also an instance tag)
    launch_token: str = ""  #: the launch that started this instance
    slots: int = 0  #: 0: one per CPU
    idle_timeout_s: float = 0.0  #: leave after this long without work; 0: never
    prefetch: int = -1  #: -1: the executor's default
    tags: dict = field(default_factory=dict)  #: str -> str, reported in the registration
    shutdown_when_idle: bool = False  #: power the machine off after leaving for idleness
    dispatcher_key: str = ""  #: the dispatcher's CURVE public key (z85), for a dispatcher with --keys
    executor_secret_key: str = ""  #: this executor's CURVE secret key (z85); its public key must be authorized

    def to_json(self) -> str:
        doc = {"falconet": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "dispatcher" or value != _DEFAULTS[f.name]:
                doc[f.name] = value
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        if len(text.encode()) > MAX_BYTES:
            raise UserDataError(f"user-data is {len(text.encode())} bytes, more than EC2's {MAX_BYTES}")
        return text


_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
             for f in dataclasses.fields(UserData)}
_TYPES: dict[str, tuple[type, ...]] = {
    "dispatcher": (str,), "cluster": (str,), "launch_token": (str,), "slots": (int,),
    "idle_timeout_s": (int, float), "prefetch": (int,), "tags": (dict,), "shutdown_when_idle": (bool,),
    "dispatcher_key": (str,), "executor_secret_key": (str,),
}


def parse(raw: bytes | str, where: str = "user-data") -> UserData:
    """Read a user-data document; raise UserDataError naming the field that is wrong."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserDataError(f"{where} is not UTF-8 text; expected a falconet JSON document") from None
    if not raw.strip():
        raise UserDataError(f"{where} is empty; launch the instance with falconet user-data "
                            "(see docs/provisioner.md)")
    raw = _falconet_part(raw, where)
    try:
        doc: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserDataError(f"{where} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise UserDataError(f"{where} must be a JSON object, not {type(doc).__name__}")
    version = doc.pop("falconet", None)
    if version is None:
        raise UserDataError(f"{where} has no 'falconet' field (the format version, {FORMAT_VERSION})")
    if type(version) is not int or version != FORMAT_VERSION:  # true == 1 and 1.0 == 1 in Python
        raise UserDataError(f"{where}: field 'falconet' is {version!r}; this executor reads "
                            f"format {FORMAT_VERSION}")
    unknown = sorted(set(doc) - set(_TYPES))
    if unknown:
        raise UserDataError(f"{where}: unknown field {unknown[0]!r}; known fields: "
                            + ", ".join(["falconet", *_TYPES]))
    if "dispatcher" not in doc:
        raise UserDataError(f"{where} has no 'dispatcher' field (tcp://HOST:PORT of the executor port)")
    for name, value in doc.items():
        types = _TYPES[name]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            want = " or ".join(t.__name__ for t in types)
            raise UserDataError(f"{where}: field {name!r} must be {want}, not {type(value).__name__}")
    try:
        address.parse(doc["dispatcher"])
    except AddressError as exc:
        raise UserDataError(f"{where}: field 'dispatcher': {exc}") from None
    if doc.get("slots", 0) < 0:
        raise UserDataError(f"{where}: field 'slots' must be 0 (one per CPU) or more")
    if not math.isfinite(doc.get("idle_timeout_s", 0)) or doc.get("idle_timeout_s", 0) < 0:
        raise UserDataError(f"{where}: field 'idle_timeout_s' must be 0 (never) or more seconds")
    if doc.get("prefetch", -1) < -1:
        raise UserDataError(f"{where}: field 'prefetch' must be -1 (the executor's default) or more")
    if bool(doc.get("dispatcher_key")) != bool(doc.get("executor_secret_key")):
        given, missing = (("dispatcher_key", "executor_secret_key") if doc.get("dispatcher_key")
                          else ("executor_secret_key", "dispatcher_key"))
        raise UserDataError(f"{where}: field {given!r} is set but {missing!r} is not; CURVE needs both")
    tags = doc.get("tags", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise UserDataError(f"{where}: field 'tags' must map strings to strings")
    return UserData(**doc)


def with_cloud_config(doc: str, cloud_config: str) -> str:
    """A multipart user-data: cloud-init's part for a stock image, then the falconet JSON."""
    if not cloud_config.startswith("#cloud-config"):
        raise UserDataError("the cloud-init template must start with '#cloud-config'")
    mime = MIMEMultipart()
    mime.attach(MIMEText(cloud_config, "cloud-config"))
    mime.attach(MIMEText(doc, CONTENT_TYPE.split("/", 1)[1]))
    text = mime.as_string()
    if len(text.encode()) > MAX_BYTES:
        raise UserDataError(f"user-data with the cloud-init template is {len(text.encode())} bytes, "
                            f"more than EC2's {MAX_BYTES}; shorten the template")
    return text


def _falconet_part(raw: str, where: str) -> str:
    """The JSON text: all of raw, or the text/x-falconet part of a multipart document."""
    head = raw.lstrip()[:200].lower()
    if head.startswith("#cloud-config"):
        raise UserDataError(f"{where} is a cloud-config document with no falconet part; give the "
                            f"provisioner the template with --cloud-init FILE, which adds one")
    if not (head.startswith("content-type:") or head.startswith("mime-version:")):
        return raw
    msg = email.message_from_string(raw, policy=email.policy.default)
    for part in msg.walk():
        if part.get_content_type() == CONTENT_TYPE:
            return part.get_content()
    raise UserDataError(f"{where} is a multipart document without a {CONTENT_TYPE} part "
                        "(see docs/provisioner.md)")
