"""Checkers for the fields of wire messages: each takes a decoded msgpack value and returns it
(or the record it makes), or raises :class:`ProtocolError` saying what was expected.

:func:`columns` is the hot path for task batches: records travel column-wise, and each
column is checked by the set of its value types, with the precise checker (and its error
message) only on a miss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import repeat
from operator import itemgetter
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


_EXACT = {integer: int, number: float, string: str, blob: bytes, boolean: bool}
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
    exact = frozenset({_EXACT[item]}) if item in _EXACT else None

    def check(v: Any) -> list:
        if type(v) is not list:
            raise ProtocolError(f"expected an array, got {type(v).__name__}")
        if exact is not None and set(map(type, v)) <= exact:  # the usual case, in one C-level pass
            return v
        return [item(x) for x in v]

    return check



def pair(v: Any) -> tuple[int, int]:
    if type(v) is not list or len(v) != 2 or type(v[0]) is not int or type(v[1]) is not int:
        raise ProtocolError("expected a [tid, attempt] pair")
    return (v[0], v[1])


_LIST, _TWO, _INT = frozenset({list}), frozenset({2}), frozenset({int})


def pairs(v: Any) -> list[tuple[int, int]]:
    """An array of [tid, attempt] pairs, checked in C-level passes, pair by pair on a miss."""
    if type(v) is not list:
        raise ProtocolError(f"expected an array, got {type(v).__name__}")
    if v and set(map(type, v)) <= _LIST and set(map(len, v)) <= _TWO:
        tids, attempts = zip(*v)
        if set(map(type, tids)) <= _INT and set(map(type, attempts)) <= _INT:
            return list(map(tuple, v))
    return [pair(x) for x in v]


class Columns(Sequence):
    """A batch of records kept as the columns it travels in (one list per field, of equal
    length), for a side that reads and writes batches a column at a time (the dispatcher):
    no tuple per record on its way through.  As a sequence it is the records, made once on
    first use, so any other reader sees what a list of records would show.  Never changed
    once made."""

    __slots__ = ("cls", "columns", "_records")

    def __init__(self, cls: type, columns: list[list]):
        self.cls = cls  #: the NamedTuple of a record
        self.columns = columns  #: one list per field of cls
        self._records: list | None = None

    def records(self) -> list:
        """The records, as a list of cls."""
        if self._records is None:
            self._records = list(map(tuple.__new__, repeat(self.cls), zip(*self.columns)))
        return self._records

    def __len__(self) -> int:
        return len(self.columns[0])

    def __iter__(self) -> Any:
        return iter(self.records())

    def __getitem__(self, i: Any) -> Any:
        return self.records()[i]

    def __eq__(self, other: Any) -> bool:
        if type(other) is Columns:
            other = other.records()
        return self.records() == other if type(other) is list else NotImplemented

    __hash__ = None  # type: ignore[assignment]  (a list of records is not hashable either)

    def __repr__(self) -> str:
        return repr(self.records())


def columns_of(batch: Sequence, n: int) -> list:
    """The n columns of a batch of records of n fields, a list each: a Columns' own, or a
    list of records transposed."""
    if type(batch) is Columns:
        return batch.columns
    return [list(c) for c in zip(*batch)] if batch else [[] for _ in range(n)]


def column(batch: Sequence, i: int) -> list:
    """Field i of every record of a batch (a Columns' own list, or one made from records)."""
    return batch.columns[i] if type(batch) is Columns else list(map(itemgetter(i), batch))


def columns(cls: type, checks: tuple) -> Callable[[Any], list]:
    """A batch of records sent column-wise: an array of len(checks) arrays of equal length,
    the i-th holding field i of every record.  Checked a column at a time (the set of its
    types, in C), with the precise checker only on a miss; returns the records.  Its
    ``kept`` attribute is the same check returning the batch as :class:`Columns`."""
    n, name, fields = len(checks), cls.__name__, cls._fields
    exact = tuple(frozenset({_EXACT[c]}) for c in checks)
    new = tuple.__new__

    def checked(v: Any) -> list:
        if type(v) is not list or len(v) != n or not set(map(type, v)) <= _LIST:
            raise ProtocolError(f"{name} records: expected an array of {n} column arrays")
        lengths = set(map(len, v))
        if len(lengths) > 1:
            raise ProtocolError(f"{name} columns differ in length ({min(lengths)} to {max(lengths)} values)")
        for i, (values, ok) in enumerate(zip(v, exact)):
            if not set(map(type, values)) <= ok:
                v[i] = _precise(values, checks[i], f"{name}.{fields[i]}")
        return v

    def check(v: Any) -> list:
        return list(map(new, repeat(cls), zip(*checked(v))))

    def kept(v: Any) -> Columns:
        return Columns(cls, checked(v))

    check.kept = kept  # type: ignore[attr-defined]
    return check


def _precise(column: list, check: Callable[[Any], Any], where: str) -> list:
    """A column checked value by value (ints in a float column become floats); the first
    bad value raises, naming the field and its index."""
    out = []
    for i, x in enumerate(column):
        try:
            out.append(check(x))
        except ProtocolError as exc:
            raise ProtocolError(f"{where}[{i}]: {exc}") from None
    return out


def transpose(records: Sequence, n: int) -> list:
    """records (tuples of n fields) as n columns, the wire form :func:`columns` reads (a
    Columns as it is)."""
    if type(records) is Columns:
        return records.columns
    cols = list(zip(*records))
    if len(cols) != n:
        if records:  # a short record would cut every column short: a programming error
            raise ValueError(f"records of {n} fields expected, got one of {min(map(len, records))}")
        return [()] * n
    return cols
