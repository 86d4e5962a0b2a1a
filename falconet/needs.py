"""What a task needs and what an executor has: the one matching rule, shared by every part.

A task's requirements travel in ``TaskSpec.needs`` as bytes: empty for a plain task (one
cpu, anywhere: the dispatcher's fast path), otherwise a msgpack map holding only the keys
that differ from the defaults::

    {"cpus": 4, "memory": 8000, "arch": "arm64", "tags": ["gpu", "site=local"],
     "where": "cloud", "prefer": "local"}

``memory`` is in MB.  ``where`` is ``any`` (default), ``local`` or ``cloud``; ``prefer``
is ``""`` or ``local`` (run on local executors while any has room, burst to the cloud
only when they are busy).  An executor's capabilities (:class:`Caps`) come from its
registration: cpus and memory (psutil, or ``--cpus``/``--memory``), its architecture, and
its tags (``--tag``, user-data), which always include ``site=local`` or ``site=cloud``.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Any

import msgpack

from falconet.errors import ProtocolError

WHERE = ("any", "local", "cloud")
PREFER = ("", "local")
_ARCH_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "aarch64": "arm64", "arm64": "arm64", "x86_64": "x86_64"}
MAX_TAGS = 32
MAX_TAG_CHARS = 128


@dataclass(frozen=True, slots=True, order=True)
class Needs:
    """A task's requirements; the defaults are a plain task's."""

    cpus: int = 1
    memory_mb: int = 0  #: 0: any
    arch: str = ""  #: "": any
    tags: tuple[str, ...] = ()  #: sorted; every one must be among the executor's tags
    where: str = "any"
    prefer: str = ""

    @property
    def plain(self) -> bool:
        return self == PLAIN

    def to_dict(self) -> dict:
        """A msgpack/JSON-friendly map of every field (for status and the provisioner)."""
        return {"cpus": self.cpus, "memory_mb": self.memory_mb, "arch": self.arch,
                "tags": list(self.tags), "where": self.where, "prefer": self.prefer}

    def __str__(self) -> str:
        parts = [f"cpus={self.cpus}"]
        if self.memory_mb:
            parts.append(f"memory={self.memory_mb}")
        if self.arch:
            parts.append(f"arch={self.arch}")
        parts += [f"tag={t}" for t in self.tags]
        if self.where != "any":
            parts.append(f"where={self.where}")
        if self.prefer:
            parts.append(f"prefer={self.prefer}")
        return " ".join(parts)


PLAIN = Needs()


def normalise_arch(arch: str) -> str:
    """x86_64 or arm64 from any common spelling (aarch64, amd64); '' stays ''."""
    if not arch:
        return ""
    found = _ARCH_ALIASES.get(arch.lower())
    if found is None:
        raise ValueError(f"arch must be one of x86_64, arm64 (or aarch64, amd64), not {arch!r}")
    return found


def make(*, cpus: int = 1, memory: int = 0, arch: str = "", tags: Any = (), where: str = "any",
         prefer: str = "") -> Needs:
    """Needs from user input; raises ValueError saying which value is wrong and why."""
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ValueError(f"cpus must be a whole number of at least 1, not {cpus!r}")
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise ValueError(f"memory must be a whole number of MB, 0 or more, not {memory!r}")
    if isinstance(tags, str):
        tags = [tags]
    tags = tuple(sorted(set(tags)))
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags, not {len(tags)}")
    for t in tags:
        if not isinstance(t, str) or not t or len(t) > MAX_TAG_CHARS or any(c.isspace() for c in t):
            raise ValueError(f"a tag is a non-empty word of at most {MAX_TAG_CHARS} characters "
                             f"without spaces, such as gpu or site=local, not {t!r}")
    if where not in WHERE:
        raise ValueError(f"where must be one of {', '.join(WHERE)}, not {where!r}")
    if prefer not in PREFER:
        raise ValueError(f"prefer must be 'local' or empty, not {prefer!r}")
    if prefer == "local" and where != "any":
        raise ValueError(f"prefer='local' needs where='any' (it may burst to the cloud), not where={where!r}")
    return Needs(cpus, memory, normalise_arch(arch), tags, where, prefer)


def encode(n: Needs) -> bytes:
    """The wire form: b'' for a plain task, else a map of the non-default fields."""
    if n == PLAIN:
        return b""
    doc: dict[str, Any] = {}
    if n.cpus != 1:
        doc["cpus"] = n.cpus
    if n.memory_mb:
        doc["memory"] = n.memory_mb
    if n.arch:
        doc["arch"] = n.arch
    if n.tags:
        doc["tags"] = list(n.tags)
    if n.where != "any":
        doc["where"] = n.where
    if n.prefer:
        doc["prefer"] = n.prefer
    return msgpack.packb(doc, use_bin_type=True)


_KEYS = frozenset({"cpus", "memory", "arch", "tags", "where", "prefer"})


def machine_arch() -> str:
    """This machine's architecture as tasks name it (x86_64, arm64), or its own name."""
    machine = platform.machine()
    return _ARCH_ALIASES.get(machine.lower(), machine)


@functools.lru_cache(maxsize=4096)
def decode(data: bytes) -> Needs:
    """Needs from the wire form, or ProtocolError naming what is wrong (cached per value)."""
    if not data:
        return PLAIN
    try:
        doc = msgpack.unpackb(data, use_list=True)
    except Exception as exc:
        raise ProtocolError(f"task needs are not msgpack ({type(exc).__name__})") from None
    if type(doc) is not dict or not set(doc) <= _KEYS:
        extra = sorted(map(str, set(doc) - _KEYS)) if type(doc) is dict else []
        raise ProtocolError("task needs must be a map of " + ", ".join(sorted(_KEYS))
                            + (f"; unknown: {', '.join(extra)}" if extra else ""))
    tags = doc.get("tags", [])
    if type(tags) is not list:
        raise ProtocolError("task needs: tags must be a list of strings")
    try:
        return make(cpus=doc.get("cpus", 1), memory=doc.get("memory", 0), arch=doc.get("arch", ""),
                    tags=tags, where=doc.get("where", "any"), prefer=doc.get("prefer", ""))
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"task needs: {exc}") from None


@dataclass(frozen=True, slots=True)
class Caps:
    """What an executor (or an instance type the provisioner can launch) offers."""

    cpus: int
    memory_mb: int
    arch: str
    tags: frozenset[str]
    site: str  #: "local" or "cloud"

    def why_not(self, n: Needs) -> str:
        """Empty when these capabilities can ever run a task with needs n, else the reason."""
        if n.cpus > self.cpus:
            return f"needs {n.cpus} cpus, has {self.cpus}"
        if n.memory_mb > self.memory_mb:
            return f"needs {n.memory_mb} MB of memory, has {self.memory_mb}"
        if n.arch and n.arch != self.arch:
            return f"needs arch {n.arch}, is {self.arch or 'unknown'}"
        if n.where != "any" and n.where != self.site:
            return f"needs where={n.where}, is {self.site}"
        missing = [t for t in n.tags if t not in self.tags]
        if missing:
            return f"lacks tag {', '.join(missing)}"
        return ""

    def satisfies(self, n: Needs) -> bool:
        """True when a task with needs n may run here (capacity, not current load)."""
        return (n.cpus <= self.cpus and n.memory_mb <= self.memory_mb
                and (not n.arch or n.arch == self.arch)
                and (n.where == "any" or n.where == self.site)
                and all(t in self.tags for t in n.tags))


def executor_tags(tags: Any, site: str) -> frozenset[str]:
    """An executor's tag set: its own, plus site=<site> unless it named a site itself."""
    out = {str(t) for t in tags}
    if not any(t.startswith("site=") for t in out):
        out.add(f"site={site}")
    return frozenset(out)


def site_of(tags: frozenset[str]) -> str:
    """The executor's site from its tags: cloud if tagged site=cloud, else local."""
    return "cloud" if "site=cloud" in tags else "local"


def tags_from_map(mapping: dict) -> list[str]:
    """User-data tags ({"site": "cloud", "gpu": ""}) as tag words (site=cloud, gpu)."""
    return [f"{k}={v}" if v not in ("", None) else str(k) for k, v in mapping.items()]


def parse_assignments(words: Any) -> Needs:
    """Needs from `key=value` words, as in task-file directives and `falconet submit`.

    Keys: cpus, memory (MB), arch, tag (repeatable), tags (comma-separated), where, prefer.
    Raises ValueError naming the word that is wrong.
    """
    kw: dict[str, Any] = {}
    tags: list[str] = []
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not value:
            raise ValueError(f"{word!r} is not key=value (keys: cpus, memory, arch, tag, where, prefer)")
        if key in ("cpus", "memory"):
            try:
                kw[key] = int(value)
            except ValueError:
                raise ValueError(f"{key} must be a whole number, not {value!r}") from None
        elif key in ("arch", "where", "prefer"):
            kw[key] = value
        elif key == "tag":
            tags.append(value)
        elif key == "tags":
            tags += [t for t in value.split(",") if t]
        else:
            raise ValueError(f"unknown requirement {key!r} (keys: cpus, memory, arch, tag, tags, where, prefer)")
    return make(tags=tags, **kw)
