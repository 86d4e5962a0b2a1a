"""Checkers for the fields of wire messages: each takes a decoded msgpack value and returns it
(or the record it makes), or raises :class:`ProtocolError` saying what was expected.

:func:`records` is the hot path for task batches: one exact type comparison per record,
with the precise checker (and its error message) only on a miss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from falconet.errors import ProtocolError


def integer(v: Any) -> int:
    if type(v) is not int:
        raise ProtocolError(f"expected an integer, got {type(v).__name__}")
    return v


def number(v: Any) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise ProtocolError(f"expected a number, got {type(v).__name__}")


def string(v: Any) -> str:
    if type(v) is not str:
        raise ProtocolError(f"expected a string, got {type(v).__name__}")
    return v


def blob(v: Any) -> bytes:
    if type(v) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(v).__name__}")
    return v


def boolean(v: Any) -> bool:
    if type(v) is not bool:
        raise ProtocolError(f"expected a boolean, got {type(v).__name__}")
    return v


_DATA = (type(None), bool, int, float, str, bytes)


def _plain_data(v: Any, depth: int = 0) -> None:
    """Maps carry plain data only: no Timestamp (msgpack decodes that extension itself)."""
    t = type(v)
    if t in _DATA:
        return
    if depth > 32:
        raise ProtocolError("a map is nested too deeply")
    if t is list:
        for x in v:
            _plain_data(x, depth + 1)
    elif t is dict:
        for x in v.values():
            _plain_data(x, depth + 1)
    else:
        raise ProtocolError(f"{t.__name__} values are not part of the protocol")


def plain_map(v: Any) -> dict:
    if type(v) is not dict:
        raise ProtocolError(f"expected a map, got {type(v).__name__}")
    _plain_data(v)
    return v


def list_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    def check(v: Any) -> list:
        if type(v) is not list:
            raise ProtocolError(f"expected an array, got {type(v).__name__}")
        return [item(x) for x in v]

    return check


_EXACT = {integer: int, number: float, string: str, blob: bytes, boolean: bool}


def record(cls: type, checks: tuple) -> Callable[[Any], Any]:
    n = len(checks)
    exact = tuple(_EXACT[c] for c in checks)  # what our own encoders always produce
    new = tuple.__new__

    def check(v: Any) -> Any:
        if type(v) is not list or len(v) != n:
            raise ProtocolError(f"malformed {cls.__name__}: expected an array of {n}")
        if tuple(map(type, v)) == exact:  # the hot path: one comparison per record
            return new(cls, v)
        return cls._make([c(x) for c, x in zip(checks, v)])  # precise checks and errors

    return check


def pair(v: Any) -> tuple[int, int]:
    if type(v) is not list or len(v) != 2 or type(v[0]) is not int or type(v[1]) is not int:
        raise ProtocolError("expected a [tid, attempt] pair")
    return (v[0], v[1])


def records(cls: type, checks: tuple) -> Callable[[Any], list]:
    """An array of records: one pass of exact type checks, the precise checker on a miss."""
    one = record(cls, checks)
    exact = tuple(_EXACT[c] for c in checks)
    new = tuple.__new__

    def check(v: Any) -> list:
        if type(v) is not list:
            raise ProtocolError(f"expected an array, got {type(v).__name__}")
        if all([type(r) is list and tuple(map(type, r)) == exact for r in v]):
            return [new(cls, r) for r in v]
        return [one(r) for r in v]

    return check
