"""What every backend offers the provisioner: start, stop and list machines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from falconet import needs
from falconet.errors import FalconetError
from falconet.provisioner.policy import InstanceType


@dataclass(frozen=True)
class Machine:
    """One node as its backend reports it.  Its id is also its executor's id."""

    id: str
    itype: str  #: InstanceType.name
    state: str  #: "pending" (the cloud is starting it, the job is queued), "running", or "ended"
    #: (a batch job that has ended and is still listed: nothing to stop)
    launched: float  #: wall-clock time of the launch
    launch_token: str = ""
    address: str = ""  #: private address, when known
    detail: str = ""  #: the backend's own words on it (a batch job's state, node and time left)
    ends_at: float = 0.0  #: wall-clock time its allocation ends (a batch job's walltime); 0: never


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


def executor_tag_map(words: tuple[str, ...] | list[str]) -> dict[str, str]:
    """--executor-tag words as the user-data map: gpu -> {"gpu": ""}, k=v -> {"k": "v"}.

    The executor turns the map back into the same words (needs.tags_from_map), so the tags a
    type is launched with are the tags its executor reports.  Raises FalconetError naming a
    bad word, or two words with the same key (the map holds one value per key).
    """
    out: dict[str, str] = {}
    for word in words:
        try:
            needs.make(tags=[word])  # the same rule as a task's tags
        except ValueError as exc:
            raise FalconetError(f"--executor-tag: {exc}") from None
        key, _, value = word.partition("=")
        if not key:
            raise FalconetError(f"--executor-tag {word!r}: a tag is a word (gpu) or KEY=VALUE (site=cloud)")
        if key in out and out[key] != value:
            raise FalconetError(f"--executor-tag {word!r}: the key {key!r} is given twice; "
                                "an executor holds one value per key")
        out[key] = value
    return out
