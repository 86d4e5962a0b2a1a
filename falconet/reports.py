"""What the components tell each other about the system: typed, frozen, one definition each.

The dispatcher's status (:class:`Status`, with its :class:`ExecutorRow` table and its
:class:`Waiting` classes) and the provisioner's fleet report (:class:`Fleet`) cross the wire
as msgpack maps and are printed by ``--json``; these classes are the one place their fields
are named.  The dispatcher builds them and sends ``to_map()``; the provisioner, the CLI and
the dispatcher (for the fleet report) read them with ``from_map()``, which raises
:class:`~falconet.errors.ProtocolError` naming the field that is missing or of the wrong type.
Keys a reader does not know are ignored, so a field can be added without breaking a reader.

Times are seconds; memory is MB everywhere (as in task needs and ``Register``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from falconet import needs as nd
from falconet.errors import ProtocolError

_SCALARS: dict[Any, tuple[type, ...]] = {
    "int": (int,), "float": (float, int), "str": (str,), "bool": (bool,), "dict": (dict,),
    "str | None": (str, type(None)), "float | None": (float, int, type(None)),
    "int | None": (int, type(None)),
}


class _Map:
    """to_map/from_map for a frozen dataclass whose fields are scalars, maps, Needs, other
    _Map classes, or tuples of those (named in ``_items``)."""

    _items: ClassVar[dict[str, Any]] = {}  #: tuple field -> type of its items (a _Map class, Needs, str...)
    _nested: ClassVar[dict[str, Any]] = {}  #: field -> its _Map class (or None allowed when the default is None)

    def to_map(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_map(cls, m: Any) -> Any:
        if not isinstance(m, dict):
            raise ProtocolError(f"{cls.__name__} must be a map, not {type(m).__name__}")
        kw = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in m:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ProtocolError(f"{cls.__name__} lacks {f.name!r}")
                continue
            kw[f.name] = cls._read(f, m[f.name])
        return cls(**kw)

    @classmethod
    def _read(cls, f: dataclasses.Field, v: Any) -> Any:
        where = f"{cls.__name__}.{f.name}"
        if f.name in cls._items:
            if not isinstance(v, (list, tuple)):
                raise ProtocolError(f"{where} must be a list, not {type(v).__name__}")
            return tuple(_read_one(cls._items[f.name], x, where) for x in v)
        if f.name in cls._nested:
            return None if v is None and f.default is None else _read_one(cls._nested[f.name], v, where)
        allowed = _SCALARS.get(f.type)
        if allowed is not None and (not isinstance(v, allowed) or (bool not in allowed and isinstance(v, bool))):
            raise ProtocolError(f"{where} must be {f.type}, not {type(v).__name__}")
        return v


def _read_one(kind: Any, v: Any, where: str) -> Any:
    if kind is nd.Needs:
        return needs_from_map(v, where)
    if isinstance(kind, type) and issubclass(kind, _Map):
        return kind.from_map(v)
    if not isinstance(v, kind):
        raise ProtocolError(f"{where} items must be {kind.__name__}, not {type(v).__name__}")
    return v


def _plain(v: Any) -> Any:
    if isinstance(v, _Map):
        return v.to_map()
    if isinstance(v, nd.Needs):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def needs_from_map(m: Any, where: str = "needs") -> nd.Needs:
    """Needs from its status form (:meth:`Needs.to_dict`), checked as user input is."""
    if not isinstance(m, dict):
        raise ProtocolError(f"{where} must be a map, not {type(m).__name__}")
    try:
        return nd.make(cpus=m.get("cpus", 1), memory=m.get("memory_mb", 0), arch=m.get("arch", ""),
                       tags=m.get("tags", ()), where=m.get("where", "any"), prefer=m.get("prefer", ""))
    except ValueError as exc:
        raise ProtocolError(f"{where}: {exc}") from None


# ---------------------------------------------------------------- the dispatcher's status


@dataclass(frozen=True)
class Waiting(_Map):
    """Queued tasks of one requirement class; reason is set when no executor can run them."""

    _nested: ClassVar[dict[str, Any]] = {"needs": nd.Needs}

    needs: nd.Needs
    count: int
    oldest_s: float  #: how long the oldest has waited
    reason: str = ""  #: why they are unschedulable ("" in the waiting list)
    since_s: float = 0.0  #: unschedulable for this long


@dataclass(frozen=True)
class ExecutorRow(_Map):
    """One executor as the dispatcher sees it."""

    _items: ClassVar[dict[str, Any]] = {"addresses": str, "tags": str}

    id: str
    host: str
    addresses: tuple[str, ...]
    pid: int
    cpus: int
    memory_mb: int
    platform: str
    slots: int
    state: str  #: an ExecutorState value: active, draining
    busy: int  #: tasks started
    assigned: int  #: tasks it holds, started or not
    completed: int
    last_seen_s: float
    idle_s: float  #: 0 while it holds a task
    registered: float  #: wall time
    arch: str
    site: str
    tags: tuple[str, ...]
    cpus_used: int  #: cpus the tasks it holds asked for
    memory_used_mb: int
    facts: dict = field(default_factory=dict)  #: e.g. instance id and type
    stats: dict = field(default_factory=dict)  #: its last reported statistics (input cache)

    @property
    def draining(self) -> bool:
        return self.state == "draining"


@dataclass(frozen=True)
class Status(_Map):
    """The dispatcher's statistics; the detail fields are filled when asked for."""

    _items: ClassVar[dict[str, Any]] = {"waiting": Waiting, "unschedulable": Waiting,
                                        "executor_table": ExecutorRow, "recent_lost": dict}
    _nested: ClassVar[dict[str, Any]] = {"fleet": None}  # set below, once Fleet exists

    dispatcher_id: str
    version: int
    uptime_s: float
    durability: str  #: "in-memory" or "journal"
    queued: int
    tasks: dict  #: task state name -> count
    submitted_total: int
    tasks_per_s: float
    executors: int
    slots: int
    busy: int  #: tasks held by executors
    lost_executors: int
    stale_results: int
    clients: int
    unacknowledged_results: int
    endpoints: dict = field(default_factory=dict)  #: "client", "executor" -> address
    journal: dict = field(default_factory=dict)  #: state_dir, journal_bytes, recovered...
    waiting: tuple[Waiting, ...] = ()
    unschedulable: tuple[Waiting, ...] = ()
    input_cache: dict = field(default_factory=dict)
    blobs: dict = field(default_factory=dict)
    security: dict = field(default_factory=dict)
    client: dict = field(default_factory=dict)  #: the asking client's tasks by state
    detail: bool = False  #: the next three were asked for; the map has them only then (fleet: if any)
    executor_table: tuple[ExecutorRow, ...] = ()
    recent_lost: tuple[dict, ...] = ()
    fleet: Fleet | None = None  #: when a provisioner reports

    def to_map(self) -> dict:
        m = super().to_map()
        if not self.detail:
            del m["executor_table"], m["recent_lost"]
        if m["fleet"] is None:
            del m["fleet"]  # no provisioner reports (or no detail)
        return m


# ---------------------------------------------------------------- the provisioner's fleet report


@dataclass(frozen=True)
class Launchable(_Map):
    """An instance type the provisioner can launch, as its executor would register."""

    _items: ClassVar[dict[str, Any]] = {"tags": str}

    type: str
    cpus: int
    memory_mb: int
    arch: str
    tags: tuple[str, ...]
    site: str

    @property
    def caps(self) -> nd.Caps:
        return nd.Caps(self.cpus, self.memory_mb, self.arch, frozenset(self.tags), self.site)


@dataclass(frozen=True)
class FleetNode(_Map):
    id: str
    type: str
    state: str  #: a NodeState value: booting, idle, busy, releasing
    age_s: float
    address: str | None = None
    detail: str | None = None  #: the backend's words: a batch job's state, node and time left


@dataclass(frozen=True)
class Decision(_Map):
    """A scaling decision: the reasons one round gave, and how often in a row."""

    _items: ClassVar[dict[str, Any]] = {"reasons": str}

    at: float  #: wall time
    reasons: tuple[str, ...]
    repeats: int = 0


@dataclass(frozen=True)
class Fleet(_Map):
    """The provisioner's picture of its fleet, sent to the dispatcher each round."""

    _items: ClassVar[dict[str, Any]] = {"nodes": FleetNode, "decisions": Decision, "unschedulable": str,
                                        "can_launch": Launchable}

    backend: str
    cluster: str
    policy: str
    min_executors: int
    max_executors: int
    interval_s: float
    counts: dict  #: requested, booting, idle, busy, releasing -> nodes
    registered: int
    nodes: tuple[FleetNode, ...] = ()
    decisions: tuple[Decision, ...] = ()
    unschedulable: tuple[str, ...] = ()  #: waiting shapes no instance type fits
    can_launch: tuple[Launchable, ...] = ()
    spent_usd: float = 0.0
    budget_usd: float = 0.0
    launch_failures: int = 0
    backoff_s: float = 0.0
    last_error: str = ""
    api_calls: dict = field(default_factory=dict)
    rounds: int = 0
    reported_s: float = 0.0  #: set by the dispatcher: how long ago it came


Status._nested = {"fleet": Fleet}
