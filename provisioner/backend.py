"""What every backend offers the provisioner: start, stop and list machines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from falconet.errors import FalconetError
from falconet.provisioner.policy import InstanceType


@dataclass(frozen=True)
class Machine:
    """One node as its backend reports it.  Its id is also its executor's id."""

    id: str
    itype: str  #: InstanceType.name
    state: str  #: "pending" (the cloud is starting it) or "running"
    launched: float  #: wall-clock time of the launch
    launch_token: str = ""
    address: str = ""  #: private address, when known


class LaunchError(FalconetError):
    """A cloud call failed; the message says why in one line (capacity, limits, bad image...).

    A FalconetError, so a failed describe or terminate is reported and the next round
    tries again, and a failure at start is one 'error:' line, not a traceback.
    """


class Backend(Protocol):
    """start(n, type) / stop(ids) / list(), as DESIGN.md names them."""

    name: str

    def types(self) -> tuple[InstanceType, ...]:
        """The instance types the user allowed, with their sizes and prices."""

    def list(self) -> list[Machine]:
        """Every live machine of this fleet (started by this run or found by tag)."""

    def start(self, itype: InstanceType, count: int, token: str) -> list[Machine]:
        """Start up to `count` machines; the same token never starts them twice."""

    def stop(self, ids: list[str]) -> None:
        """Stop (terminate) these machines now."""

    def api_calls(self) -> dict[str, int]:
        """Calls made to the cloud's API so far, by operation."""
