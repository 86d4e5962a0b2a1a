"""Property tests of falconet.protocol: every message round trips; garbage raises ProtocolError only."""

from __future__ import annotations

import dataclasses
import math
import re
import struct

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from falconet import protocol as p
from falconet.errors import ProtocolError
from falconet.fields import Columns

FAST = settings(max_examples=200, deadline=None)
SOME = settings(max_examples=100, deadline=None)  # the many garbage shapes; together they add up
PER_CLASS = settings(max_examples=25, deadline=None)

# ---------------------------------------------------------------- strategies

INTS = st.integers(-(2**63), 2**64 - 1)  # everything msgpack can carry
FLOATS = st.floats(allow_nan=False)  # nan != nan: see test_round_trip_with_nan for it
TEXT = st.text(max_size=20)
BYTES = st.binary(max_size=40)


def _values(floats: st.SearchStrategy) -> st.SearchStrategy:
    """Anything msgpack carries without extensions, as decode hands it back (lists, str keys)."""
    leaves = st.none() | st.booleans() | INTS | floats | TEXT | BYTES
    return st.recursive(
        leaves,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
        max_leaves=8,
    )


def _field_strategies(floats: st.SearchStrategy, min_size: int) -> dict[type, tuple]:
    """One strategy per field of every message class, in field order."""

    def lists(item: st.SearchStrategy) -> st.SearchStrategy:
        return st.lists(item, min_size=min_size, max_size=4)

    maps = st.dictionaries(TEXT, _values(floats), max_size=5)
    pairs = st.tuples(INTS, INTS)  # decode gives [tid, attempt] back as a tuple
    specs = st.builds(p.TaskSpec, INTS, INTS, BYTES, INTS, floats, BYTES, BYTES)
    assignments = st.builds(p.Assignment, INTS, INTS, INTS, BYTES, floats, INTS, BYTES)
    exec_results = st.builds(p.ExecResult, INTS, INTS, INTS, BYTES, TEXT, floats, floats, BYTES)
    task_results = st.builds(
        p.TaskResult, INTS, INTS, BYTES, TEXT, TEXT, INTS, floats, floats, floats, BYTES
    )
    return {
        p.Hello: (INTS, TEXT, TEXT),
        p.Submit: (INTS, lists(specs)),
        p.Cancel: (lists(INTS),),
        p.Ack: (lists(INTS),),
        p.StatusRequest: (INTS, st.booleans()),
        p.EventsRequest: (INTS, INTS, FLOATS, INTS),
        p.Release: (lists(TEXT), TEXT),
        p.FleetReport: (maps,),
        p.Welcome: (INTS, TEXT, maps),
        p.Accepted: (INTS, INTS),
        p.Results: (lists(task_results),),
        p.StatusReply: (INTS, maps),
        p.Refused: (TEXT,),
        p.HelloAgain: (TEXT,),
        p.Started: (lists(INTS),),
        p.Register: (
            INTS, TEXT, TEXT, lists(TEXT), INTS, INTS, TEXT, INTS, INTS, maps, lists(pairs)
        ),
        p.Report: (INTS, lists(pairs), lists(exec_results), maps),
        p.Drain: (lists(pairs),),
        p.Bye: (),
        p.Registered: (TEXT, floats, floats, INTS, INTS),
        p.Tasks: (lists(assignments),),
        p.CancelTasks: (lists(INTS),),
        p.Reregister: (TEXT,),
        p.Leave: (TEXT,),
        p.Heartbeat: (),
        p.PutBlob: (TEXT, INTS, INTS, BYTES),
        p.GetBlob: (TEXT, INTS),
        p.BlobData: (TEXT, INTS, INTS, BYTES, TEXT),
        p.DropBlobs: (lists(TEXT),),
    }


FIELDS = _field_strategies(FLOATS, min_size=0)
FIELDS_NAN = _field_strategies(st.floats(), min_size=0)
FIELDS_NONEMPTY = _field_strategies(FLOATS, min_size=1)

TAGS = sorted(p._REGISTRY)
CLASSES = [p._REGISTRY[t][0] for t in TAGS]


def _name(tag: int) -> str:
    return p._REGISTRY[tag][0].__name__


def messages(cls: type, table: dict = FIELDS) -> st.SearchStrategy:
    """Messages of one class; a class without strategies fails loudly, naming itself."""
    if cls not in table:
        pytest.fail(f"no strategy for {cls.__name__}: add its fields to _field_strategies")
    return st.builds(cls, *table[cls])


ANY_MESSAGE = st.sampled_from(CLASSES).flatmap(messages)
WITH_ARRAYS = [c for c in CLASSES if any(f.type in ("list", list) for f in dataclasses.fields(c))]
ANY_NONEMPTY = st.sampled_from(WITH_ARRAYS).flatmap(lambda c: messages(c, FIELDS_NONEMPTY))


def raw(msg) -> list:
    """The message as the plain msgpack array a peer would see."""
    return msgpack.unpackb(p.encode(msg))


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def decodes_or_refuses(frame) -> None:
    """decode either returns a registered message or raises ProtocolError; nothing else."""
    try:
        msg = p.decode(frame)
    except ProtocolError:
        return
    assert type(msg) in CLASSES


# families of msgpack values; a field accepts only its own (a float field also takes an int)
def _family(v) -> str:
    if v is None:
        return "nil"
    if isinstance(v, (list, tuple)):
        return "array"
    return {bool: "bool", int: "int", float: "float", str: "str", bytes: "bin", dict: "map"}[type(v)]


_FAMILY_VALUES = {
    "nil": st.none(),
    "bool": st.booleans(),
    "int": INTS,
    "float": FLOATS,
    "str": TEXT,
    "bin": BYTES,
    "array": st.lists(INTS, max_size=3),
    "map": st.dictionaries(TEXT, INTS, max_size=3),
}
_ACCEPTS = {"float": {"float", "int"}}


def wrong_value_for(valid) -> st.SearchStrategy:
    """Values of any family a field holding `valid` must refuse."""
    fam = _family(valid)
    accepted = _ACCEPTS.get(fam, {fam})
    return st.one_of([s for f, s in _FAMILY_VALUES.items() if f not in accepted])


# ---------------------------------------------------------------- the registry is covered


def test_every_registered_message_has_strategies():
    registered = {cls for cls, _ in p._REGISTRY.values()}
    assert set(FIELDS) == registered
    assert {int(t) for t in p.MsgType} == set(p._REGISTRY)
    for tag, (cls, checks) in p._REGISTRY.items():
        assert tag == cls.TYPE
        assert len(FIELDS[cls]) == len(checks) == len(dataclasses.fields(cls))
        assert cls.__dataclass_params__.frozen and "__slots__" in cls.__dict__


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("tag", TAGS, ids=_name)
@PER_CLASS
@given(data=st.data())
def test_round_trip(tag, data):
    cls = p._REGISTRY[tag][0]
    msg = data.draw(messages(cls))
    frame = p.encode(msg)
    assert type(frame) is bytes
    plain = msgpack.unpackb(frame)
    assert plain[0] == tag and len(plain) == 1 + len(dataclasses.fields(cls))
    back = p.decode(frame)
    assert type(back) is cls
    assert back == msg
    assert p.encode(back) == frame


@FAST
@given(msg=st.sampled_from(CLASSES).flatmap(lambda c: messages(c, FIELDS_NAN)))
def test_round_trip_with_nan(msg):
    frame = p.encode(msg)
    back = p.decode(frame)
    assert p.encode(back) == frame  # bytes compare nan payloads exactly
    for name in msg._names:
        sent, got = getattr(msg, name), getattr(back, name)
        if isinstance(sent, float):
            assert math.isnan(got) if math.isnan(sent) else got == sent


def test_round_trip_keeps_records_typed():
    spec = p.TaskSpec(1, p.TaskKind.COMMAND, b"x", 0, 0.0)
    back = p.decode(p.encode(p.Submit(7, [spec])))
    assert type(back.tasks[0]) is p.TaskSpec and back.tasks[0].body == b"x"
    back = p.decode(p.encode(p.Drain([(3, 1)])))
    assert back.returned == [(3, 1)]


def test_float_fields_accept_integers():
    back = p.decode(pack([p.MsgType.REGISTERED, "d1", 5, 30, 1024, 512]))
    assert back == p.Registered("d1", 5.0, 30.0, 1024, 512) and type(back.heartbeat_interval_s) is float
    back = p.decode(pack([p.MsgType.SUBMIT, 1, [[1], [1], [b""], [0], [60], [b""], [b""]]]))
    assert type(back.tasks[0].walltime_s) is float


# ---------------------------------------------------------------- record batches, column-wise

#: message class -> (index of its record batch in the encoded array, record class)
BATCHES = {p.Submit: (2, p.TaskSpec), p.Tasks: (1, p.Assignment), p.Report: (3, p.ExecResult),
           p.Results: (1, p.TaskResult)}
ANY_BATCH = st.sampled_from(sorted(BATCHES, key=lambda c: c.TYPE)).flatmap(lambda c: messages(c, FIELDS_NONEMPTY))


@FAST
@given(msg=ANY_BATCH)
def test_record_batches_travel_column_wise(msg):
    at, record = BATCHES[type(msg)]
    records = getattr(msg, msg._names[at - 1])
    columns = raw(msg)[at]
    assert len(columns) == len(record._fields)
    assert [list(c) for c in zip(*records)] == columns, "field i of every record, in the i-th array"


@FAST
@given(msg=ANY_MESSAGE)
def test_batches_kept_as_columns_are_the_same_message(msg):
    """decode(columns=True), as the dispatcher reads: the same message to any reader, and
    the same frame when sent on."""
    frame = p.encode(msg)
    records, kept = p.decode(frame), p.decode(frame, columns=True)
    assert kept == records and repr(kept) == repr(records)
    assert p.encode(kept) == frame
    if type(msg) in BATCHES:
        at, record = BATCHES[type(msg)]
        batch = getattr(kept, msg._names[at - 1])
        assert type(batch) is Columns and batch.columns == raw(msg)[at]
        assert len(batch) == len(getattr(records, msg._names[at - 1]))
        assert all(type(r) is record for r in batch) and list(batch) == getattr(records, msg._names[at - 1])


@SOME
@given(msg=ANY_BATCH, data=st.data())
def test_batches_kept_as_columns_refuse_what_records_refuse(msg, data):
    """Any change to a batch's columns: both decodings refuse it alike, or both take it."""
    at, record = BATCHES[type(msg)]
    fields = raw(msg)
    columns = fields[at]
    i = data.draw(st.integers(0, len(columns) - 1))
    j = data.draw(st.integers(0, len(columns[i]) - 1))
    columns[i][j] = data.draw(_values(FLOATS))
    frame = pack(fields)
    outcomes = []
    for columns_kept in (False, True):
        try:
            outcomes.append(repr(p.decode(frame, columns=columns_kept)))
        except ProtocolError as exc:
            outcomes.append(f"refused: {exc}")
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("msg", [p.Submit(1, []), p.Tasks([]), p.Report(1, [], [], {}), p.Results([])],
                         ids=lambda m: type(m).__name__)
def test_an_empty_batch_is_one_empty_array_per_field(msg):
    at, record = BATCHES[type(msg)]
    assert raw(msg)[at] == [[]] * len(record._fields)
    assert p.decode(p.encode(msg)) == msg


@SOME
@given(msg=ANY_BATCH, data=st.data())
def test_columns_of_unequal_length_are_refused_naming_the_record(msg, data):
    at, record = BATCHES[type(msg)]
    arr = raw(msg)
    i = data.draw(st.integers(0, len(record._fields) - 1), label="column")
    if data.draw(st.booleans(), label="grow"):
        arr[at][i].append(arr[at][i][0])
    else:
        arr[at][i].pop()
    with pytest.raises(ProtocolError, match=f"{record.__name__} columns differ in length"):
        p.decode(pack(arr))


@SOME
@given(msg=ANY_BATCH, data=st.data())
def test_a_missing_or_extra_column_is_refused(msg, data):
    at, record = BATCHES[type(msg)]
    arr = raw(msg)
    if data.draw(st.booleans(), label="extra"):
        arr[at].append(list(arr[at][0]))
    else:
        arr[at].pop(data.draw(st.integers(0, len(arr[at]) - 1), label="column"))
    with pytest.raises(ProtocolError, match=f"{record.__name__} records: expected an array of "
                                            f"{len(record._fields)} column arrays"):
        p.decode(pack(arr))


@FAST
@given(msg=ANY_BATCH, data=st.data())
def test_a_bad_value_in_a_column_is_refused_naming_field_and_index(msg, data):
    at, record = BATCHES[type(msg)]
    arr = raw(msg)
    i = data.draw(st.integers(0, len(record._fields) - 1), label="column")
    j = data.draw(st.integers(0, len(arr[at][i]) - 1), label="index")
    arr[at][i][j] = data.draw(wrong_value_for(arr[at][i][j]), label="wrong value")
    with pytest.raises(ProtocolError) as info:
        p.decode(pack(arr))
    text = str(info.value)
    assert text.startswith(f"{type(msg).__name__}: {record.__name__}.{record._fields[i]}[{j}]: expected"), text
    assert "\n" not in text


@pytest.mark.parametrize("column", [None, 3, "x", {"a": 1}, b"\x90"])
def test_a_column_that_is_not_an_array_is_refused(column):
    columns = [[1], [1], [3], [b""], [""], [1.0], [1.0], [b""]]
    columns[3] = column
    with pytest.raises(ProtocolError, match="ExecResult records: expected an array of 8 column arrays"):
        p.decode(pack([p.MsgType.REPORT, 1, [], columns, {}]))


@pytest.mark.parametrize("records", [[("short",)], [(1, 2, 3, b"", "", 1.0, 2.0, b"", "long")]])
def test_a_record_of_the_wrong_size_is_not_encoded(records):
    with pytest.raises(ValueError, match="records of 8 fields"):
        p.encode(p.Report(0, [], records, {}))


# ---------------------------------------------------------------- garbage


@FAST
@given(frame=st.binary(max_size=200))
def test_random_bytes_raise_protocol_error_only(frame):
    decodes_or_refuses(frame)


@FAST
@given(msg=ANY_MESSAGE, data=st.data())
def test_mutated_frames_raise_protocol_error_only(msg, data):
    frame = bytearray(p.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=5))
        elif frame:
            del frame[i]
    decodes_or_refuses(bytes(frame))


@FAST
@given(msg=ANY_MESSAGE)
def test_truncated_frames_raise_protocol_error(msg):
    frame = p.encode(msg)
    for end in range(len(frame)):
        with pytest.raises(ProtocolError):
            p.decode(frame[:end])


@SOME
@given(msg=ANY_MESSAGE, tail=st.binary(min_size=1, max_size=10))
def test_trailing_bytes_raise_protocol_error(msg, tail):
    with pytest.raises(ProtocolError):
        p.decode(p.encode(msg) + tail)


@SOME
@given(tag=st.sampled_from(TAGS), fields=st.lists(_values(FLOATS), max_size=12))
def test_any_msgpack_array_with_a_known_tag_is_decoded_or_refused(tag, fields):
    try:
        msg = p.decode(pack([tag, *fields]))
    except ProtocolError:
        return
    assert type(msg) is p._REGISTRY[tag][0]
    assert p.decode(p.encode(msg)) == msg


@SOME
@given(value=_values(FLOATS))
def test_any_msgpack_value_is_decoded_or_refused(value):
    decodes_or_refuses(pack(value))


@SOME
@given(msg=ANY_MESSAGE, extra=_values(FLOATS))
def test_one_field_too_many_is_refused(msg, extra):
    with pytest.raises(ProtocolError, match="fields"):
        p.decode(pack(raw(msg) + [extra]))


@SOME
@given(msg=ANY_MESSAGE.filter(lambda m: m._names))
def test_one_field_too_few_is_refused(msg):
    with pytest.raises(ProtocolError, match="fields"):
        p.decode(pack(raw(msg)[:-1]))


@FAST
@given(msg=ANY_MESSAGE.filter(lambda m: m._names), data=st.data())
def test_field_of_the_wrong_type_is_refused(msg, data):
    arr = raw(msg)
    i = data.draw(st.integers(1, len(arr) - 1), label="field")
    arr[i] = data.draw(wrong_value_for(arr[i]), label="wrong value")
    with pytest.raises(ProtocolError, match=type(msg).__name__):
        p.decode(pack(arr))


def _array_fields(arr: list) -> list[int]:
    """Indexes of array-valued fields (their items are checked; map contents are not)."""
    return [i for i in range(1, len(arr)) if type(arr[i]) is list and arr[i]]


@FAST
@given(msg=ANY_NONEMPTY, data=st.data())
def test_item_of_the_wrong_type_is_refused(msg, data):
    arr = raw(msg)
    sites = _array_fields(arr)
    assume(sites)
    i = data.draw(st.sampled_from(sites), label="field")
    j = data.draw(st.integers(0, len(arr[i]) - 1), label="item")
    item = arr[i][j]
    if type(item) is list:  # a record or a pair: spoil one of its elements
        k = data.draw(st.integers(0, len(item) - 1), label="element")
        item[k] = data.draw(wrong_value_for(item[k]), label="wrong value")
    else:
        arr[i][j] = data.draw(wrong_value_for(item), label="wrong value")
    with pytest.raises(ProtocolError):
        p.decode(pack(arr))


@SOME
@given(msg=ANY_NONEMPTY, data=st.data())
def test_nested_record_of_the_wrong_arity_is_refused(msg, data):
    arr = raw(msg)
    sites = [i for i in _array_fields(arr) if type(arr[i][0]) is list]
    assume(sites)
    i = data.draw(st.sampled_from(sites), label="field")
    j = data.draw(st.integers(0, len(arr[i]) - 1), label="record")
    if data.draw(st.booleans(), label="grow"):
        arr[i][j].append(data.draw(_values(FLOATS)))
    else:
        arr[i][j].pop(data.draw(st.integers(0, len(arr[i][j]) - 1)))
    with pytest.raises(ProtocolError):
        p.decode(pack(arr))


@SOME
@given(tag=INTS.filter(lambda t: t not in p._REGISTRY), fields=st.lists(_values(FLOATS), max_size=4))
def test_unknown_type_tag_is_refused(tag, fields):
    with pytest.raises(ProtocolError, match="unknown message type"):
        p.decode(pack([tag, *fields]))


@SOME
@given(tag=st.none() | st.booleans() | FLOATS | TEXT | BYTES | st.lists(INTS, max_size=2),
       fields=st.lists(_values(FLOATS), max_size=4))
def test_tag_that_is_not_an_integer_is_refused(tag, fields):
    with pytest.raises(ProtocolError):
        p.decode(pack([tag, *fields]))


@pytest.mark.parametrize("value", [[], {}, 21, "HELLO", b"\x01", None, 1.5, True])
def test_frame_that_is_not_a_tagged_array_is_refused(value):
    with pytest.raises(ProtocolError):
        p.decode(pack(value))


@SOME
@given(msg=ANY_MESSAGE)
def test_map_instead_of_array_is_refused(msg):
    by_name = {"type": int(msg.TYPE), **{n: v for n, v in zip(msg._names, raw(msg)[1:])}}
    with pytest.raises(ProtocolError):
        p.decode(pack(by_name))
    by_position = dict(enumerate(raw(msg)))  # integer keys: refused by msgpack's strict_map_key
    with pytest.raises(ProtocolError):
        p.decode(pack(by_position))


@SOME
@given(msg=ANY_NONEMPTY, code=st.integers(0, 127), payload=st.binary(max_size=20), data=st.data())
def test_extension_types_are_refused_anywhere(msg, code, payload, data):
    ext = msgpack.ExtType(code, payload)
    arr = raw(msg)
    where = data.draw(st.sampled_from(["top", "field", "item", "map"]), label="where")
    if where == "top":
        frame = pack(ext)
    elif where == "field":
        frame = pack([*arr[:-1], ext])
    elif where == "item":  # ANY_NONEMPTY messages all have a non-empty array field
        arr[_array_fields(arr)[0]][0] = ext
        frame = pack(arr)
    else:
        frame = pack([p.MsgType.WELCOME, 1, "d", {"k": [ext]}])
    with pytest.raises(ProtocolError, match="extension"):
        p.decode(frame)


@pytest.mark.parametrize("code", [-128, -2, -127])
def test_reserved_negative_extension_types_are_refused(code):
    frame = b"\x94\x0a\x01\xa1d\x81\xa1k\xd6" + struct.pack("b", code) + b"abcd"  # Welcome, limits={"k": ext}
    with pytest.raises(ProtocolError):
        p.decode(frame)


def test_timestamp_extension_is_refused_inside_a_map_field():
    frame = pack([p.MsgType.WELCOME, 1, "d", {"t": msgpack.Timestamp(1, 0)}])
    with pytest.raises(ProtocolError):
        p.decode(frame)


HUGE_HEADERS = {
    "str32": b"\xdb\xff\xff\xff\xff",
    "bin32": b"\xc6\xff\xff\xff\xff",
    "array32": b"\xdd\xff\xff\xff\xff",
    "map32": b"\xdf\xff\xff\xff\xff",
    "ext32": b"\xc9\xff\xff\xff\xff\x01",
    "str16": b"\xda\xff\xff",
    "array16": b"\xdc\xff\xff",
}


@pytest.mark.parametrize("header", HUGE_HEADERS.values(), ids=HUGE_HEADERS.keys())
@pytest.mark.parametrize(
    "prefix", [b"", b"\x94\x01\x01", b"\x92\x0b"], ids=["top", "Hello field", "Results field"]
)
def test_huge_declared_lengths_are_refused(prefix, header):
    with pytest.raises(ProtocolError):
        p.decode(prefix + header + b"\x00" * 16)


def test_deep_nesting_is_refused():
    with pytest.raises(ProtocolError):
        p.decode(b"\x91" * 100_000)


@pytest.mark.parametrize("frame", [None, "text", 42, [1, 2]])
def test_non_bytes_frame_is_refused(frame):
    with pytest.raises(ProtocolError):
        p.decode(frame)


def test_invalid_utf8_in_a_string_is_refused():
    with pytest.raises(ProtocolError):
        p.decode(b"\x92\x0e\xa2\xff\xfe")  # Refused(reason=<bad utf-8>)


# ---------------------------------------------------------------- versions


def test_check_version_accepts_its_own():
    assert p.check_version(p.PROTOCOL_VERSION) == ""


@SOME
@given(version=INTS.filter(lambda v: v != p.PROTOCOL_VERSION))
def test_check_version_refuses_others_naming_both(version):
    reason = p.check_version(version)
    assert reason
    named = {int(n) for n in re.findall(r"-?\d+", reason)}
    assert version in named and p.PROTOCOL_VERSION in named


@given(state=st.integers(-3, 9), output=BYTES, reason=TEXT)
def test_a_task_result_reads_as_words_not_bytes(state, output, reason):
    r = p.TaskResult(7, state, output, reason, "ex-1", 2, 10.0, 10.5, 10.75)
    text = repr(r)
    assert text.startswith("TaskResult(seq=7, state=") and f"output={len(output)} bytes" in text
    assert "b'" not in text.replace(repr(reason), "")  # the output's bytes are never shown
    name = p.TaskState(state).name.lower() if 0 <= state <= 5 else str(state)
    assert r.state_name == name and f"state={name}," in text and "ran=0.250s" in text
