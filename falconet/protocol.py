"""The falconet wire protocol: every message that crosses a socket, and its codec.

Transport
---------
The dispatcher binds two ZeroMQ ROUTER sockets: the *client port* (Python API, CLI) and
the *executor port*.  Clients and executors connect DEALER sockets and set their routing
id to their own id (``client_id`` / ``executor_id``), so a reconnecting peer keeps its
identity.  Every ZeroMQ message is a single frame (the ROUTER adds the identity frame):
a msgpack array ``[type, field1, field2, ...]`` where ``type`` is a :class:`MsgType`
and the fields follow the order of the dataclass below.  Per-task records inside batches
(``TaskSpec``, ``Assignment``, ``ExecResult``, ``TaskResult``) travel *column-wise*: a batch
of k records is an array of one array per NamedTuple field, in field order, each of k values
(``[[tid1, tid2], [attempt1, attempt2], ...]``), so a receiver checks a batch a column at a
time; every column must have the same length.  Wall-clock times are float seconds since the epoch;
durations are float seconds.  Task bodies and outputs are opaque bytes to the dispatcher
(see :mod:`falconet.tasks`).

Sequences
---------
Client::

    Hello -> Welcome | Refused          (version checked here; required before the rest)
      <- HelloAgain(reason)             "I do not know you": say Hello again
    Submit(batch, tasks) -> Accepted(batch) ... Started(seqs) as they start,
                                        Results(...) as they finish
    Ack(seqs)                           the client has these results; the dispatcher keeps
                                        each result until acknowledged and sends every
                                        unacknowledged one again after a Hello
    Cancel(seqs)       -> Results with state CANCELLED for tasks not yet started
    StatusRequest(req) -> StatusReply(req, info)
    EventsRequest(req, after, since, limit) -> StatusReply(req, {events, next, first, dropped})

Executor::

    Register -> Registered | Refused    (version checked here; a new dispatcher_id in
                                         Registered means a restarted dispatcher)
    Report(credit, started, results, stats)  credit = how many *more* tasks it can take now
      <- Tasks(assignments)             never more than the credit granted
    Heartbeat  <->  Heartbeat           any message counts as a sign of life
    Drain(returned)                     no more credit; these tasks were never started
    Bye                                 all results sent; forget me
      <- CancelTasks(tids)              drop these if not started
      <- Reregister(reason)             "I do not know you": register again

A message from an executor the dispatcher does not know (declared lost, or a restarted
dispatcher) is answered by ``Reregister``; its results are accepted only if the task's
current attempt is the one it reports, so every task has exactly one result.

Wrong port::

    Register, or another message only executors send, on the client port  -> Refused(WRONG_PORT...)
    Hello, or another message only clients send, on the executor port     -> Refused(WRONG_PORT...)

from a peer the port does not know.  The reason reads ``"wrong port: this is the
dispatcher's client port; executors connect to its executor port, 5556 (...)"``; a peer
shows it with the address it used in place of ``"wrong port: this"`` (:func:`refusal_text`).

Blobs (either port)::

    PutBlob(digest, offset, total, data)  chunks of a file, in order; stored once verified
    GetBlob(digest, offset) -> BlobData(digest, offset, total, data, error) chunks
    DropBlobs(digests)                    (client) these files are no longer needed

A client uploads a task's input files before the Submit that names them; an executor
uploads a task's outputs for the client before the Report carrying its result.

A client re-sends a Submit whose Accepted it did not see (the dispatcher restarted) with
the same batch number; the dispatcher accepts each batch number of a client once.  A
client that a restarted dispatcher knows from its journal must say Hello again before
anything else: every other message is answered ``HelloAgain`` until it does, which is how
the client learns of the restart (the way ``Reregister`` tells an executor).

``Refused`` keeps its one field in every version: it carries the version refusal, which a
peer of another version must still be able to read.

Malformed input of any kind raises :class:`ProtocolError` from :func:`decode`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any, NamedTuple

import msgpack

from falconet import fields as f
from falconet.errors import ProtocolError

#: 2: Ack, results kept until acknowledged; 3: needs, staging, blobs; 4: HelloAgain, where a
#: Refused reason starting "say Hello first" told a client of a restarted dispatcher; 5: Register's
#: memory in MB; 6: Started, which tells a client which of its tasks began running; 7: EventsRequest;
#: 8: Registered.max_output_bytes; 9: batches of records (Submit, Tasks, Report, Results) column-wise
PROTOCOL_VERSION = 9
#: Refused.reason prefix for a message that belongs on the dispatcher's other port.
WRONG_PORT = "wrong port: this is"
#: Bytes of msgpack framing counted for each record when filling a message.
RECORD_OVERHEAD = 64


def record_budget(max_message_bytes: int) -> int:
    """Bytes of records one message may carry: half the receiver's limit, leaving room for
    the framing of many records.  A record larger than this can never be sent."""
    return max_message_bytes // 2


def runs(records: list, field: int, max_count: int, max_message_bytes: int) -> Iterator[list]:
    """records in runs of at most max_count and the record budget of their bytes field (index
    field, plus RECORD_OVERHEAD each): each run fits one message (and one journal record)."""
    budget = record_budget(max_message_bytes)
    if len(records) <= max_count and sum(map(len, map(itemgetter(field), records))) + RECORD_OVERHEAD * len(records) <= budget:
        yield records  # the usual case: one run, no per-record loop in Python
        return
    start, size = 0, 0
    for i, r in enumerate(records):
        size += len(r[field]) + RECORD_OVERHEAD
        if i > start and (i - start >= max_count or size > budget):
            yield records[start:i]
            start, size = i, len(r[field]) + RECORD_OVERHEAD
    if start < len(records):
        yield records[start:]


class MsgType(enum.IntEnum):
    """Tag of every message; the first element of each encoded array."""

    # client -> dispatcher
    HELLO = 1
    SUBMIT = 2
    CANCEL = 3
    STATUS_REQUEST = 4
    RELEASE = 5
    FLEET_REPORT = 6
    ACK = 7
    EVENTS_REQUEST = 8
    # dispatcher -> client
    WELCOME = 10
    ACCEPTED = 11
    RESULTS = 12
    STATUS_REPLY = 13
    REFUSED = 14
    HELLO_AGAIN = 15
    STARTED = 16
    # executor -> dispatcher
    REGISTER = 20
    REPORT = 21
    DRAIN = 22
    BYE = 23
    # dispatcher -> executor
    REGISTERED = 30
    TASKS = 31
    CANCEL_TASKS = 32
    REREGISTER = 33
    LEAVE = 34
    # both ways on the executor port
    HEARTBEAT = 40
    # blobs (staged files), on either port
    PUT_BLOB = 50
    GET_BLOB = 51
    BLOB_DATA = 52
    DROP_BLOBS = 53


class TaskKind(enum.IntEnum):
    """What a task body holds."""

    COMMAND = 1  #: a shell line or argv, run as a process
    PYTHON = 2  #: a cloudpickled function with its arguments


class TaskState(enum.IntEnum):
    """Life of a task in the dispatcher; see falconet.dispatcher.states for the rules."""

    PENDING = 0  #: queued, waiting for an executor with credit
    DISPATCHED = 1  #: sent to an executor, not yet reported started
    RUNNING = 2  #: the executor handed it to a slot
    DONE = 3  #: finished successfully (exit code 0 / returned a value)
    FAILED = 4  #: finished unsuccessfully, or could not be run
    CANCELLED = 5  #: cancelled before it started


FINAL_STATES = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})


# ---------------------------------------------------------------- per-task records


class TaskSpec(NamedTuple):
    """One task as a client submits it."""

    seq: int  #: the client's own id for the task, unique per client
    kind: int  #: a TaskKind
    body: bytes  #: kind-specific encoding, opaque to the dispatcher
    retries: int  #: re-runs allowed after a lost executor or dead slot
    walltime_s: float  #: 0 means no limit
    needs: bytes = b""  #: requirements (falconet.needs); b"" for a plain task: one cpu, anywhere
    files: bytes = b""  #: inputs and outputs to stage (falconet.staging); b"" for none


class Assignment(NamedTuple):
    """One task as the dispatcher hands it to an executor."""

    tid: int  #: the dispatcher's id for the task
    attempt: int  #: 1 for the first run, +1 on each re-run
    kind: int
    body: bytes
    walltime_s: float
    cpus: int = 1  #: cpus the task holds while it runs (the executor packs its slots by them)
    files: bytes = b""  #: TaskSpec.files, passed through


class ExecResult(NamedTuple):
    """One finished attempt as an executor reports it."""

    tid: int
    attempt: int
    state: int  #: DONE, FAILED or CANCELLED
    output: bytes  #: kind-specific encoding, opaque to the dispatcher
    reason: str  #: empty when DONE; otherwise why it failed
    started: float  #: wall clock on the executor's host
    finished: float
    files: bytes = b""  #: staged outputs (falconet.staging result files); b"" for none


class TaskResult(NamedTuple):
    """One task's final outcome as the dispatcher returns it to its client."""

    seq: int
    state: int
    output: bytes
    reason: str
    executor: str  #: executor id that produced it ("" when it never ran)
    attempts: int
    submitted: float  #: wall clock on the dispatcher's host
    started: float
    finished: float
    files: bytes = b""  #: staged outputs, as ExecResult.files

    @property
    def state_name(self) -> str:
        """'done', 'failed' or 'cancelled' (the number for a state this version does not know)."""
        return TaskState(self.state).name.lower() if self.state in _STATE_VALUES else str(self.state)

    def __repr__(self) -> str:
        """The state by name, where and how long it ran, and the output's size, not its bytes."""
        took = f"{self.finished - self.started:.3f}s" if self.started and self.finished else "-"
        why = f", reason={self.reason!r}" if self.reason else ""
        return (f"TaskResult(seq={self.seq}, state={self.state_name}, executor={self.executor!r}, "
                f"attempts={self.attempts}, ran={took}, output={len(self.output)} bytes{why})")


_STATE_VALUES = frozenset(int(s) for s in TaskState)


# Batches of records travel column-wise (version 9): one array per field, checked a column at a time.
_task_specs = f.columns(TaskSpec, (f.integer, f.integer, f.blob, f.integer, f.number, f.blob, f.blob))
_assignments = f.columns(Assignment, (f.integer, f.integer, f.integer, f.blob, f.number, f.integer, f.blob))
_exec_results = f.columns(ExecResult, (f.integer, f.integer, f.integer, f.blob, f.string, f.number, f.number, f.blob))
_task_results = f.columns(
    TaskResult, (f.integer, f.integer, f.blob, f.string, f.string, f.integer, f.number, f.number, f.number, f.blob)
)
#: message type -> (index of its record batch in the encoded array, fields per record)
_COLUMNAR = {int(MsgType.SUBMIT): (2, len(TaskSpec._fields)), int(MsgType.TASKS): (1, len(Assignment._fields)),
             int(MsgType.REPORT): (3, len(ExecResult._fields)), int(MsgType.RESULTS): (1, len(TaskResult._fields))}

# ---------------------------------------------------------------- messages

_REGISTRY: dict[int, tuple[type, tuple]] = {}


def _message(tag: MsgType, *checks: Callable[[Any], Any]):
    """Declare a message dataclass with its tag and one checker per field."""

    def wrap(cls: type) -> type:
        cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
        names = [field.name for field in dataclasses.fields(cls)]
        if len(names) != len(checks):  # a programming error, caught at import
            raise TypeError(f"{cls.__name__}: {len(names)} fields, {len(checks)} checkers")
        cls.TYPE = tag
        cls._names = tuple(names)
        _REGISTRY[int(tag)] = (cls, checks)
        return cls

    return wrap


@_message(MsgType.HELLO, f.integer, f.string, f.string)
class Hello:
    """A client introduces itself; required before any other client message."""

    version: int
    client_id: str
    name: str


@_message(MsgType.SUBMIT, f.integer, _task_specs)
class Submit:
    """A batch of tasks; acknowledged by Accepted(batch)."""

    batch: int
    tasks: list


@_message(MsgType.CANCEL, f.list_of(f.integer))
class Cancel:
    """Cancel the client's tasks with these seqs, if they have not started."""

    seqs: list


@_message(MsgType.ACK, f.list_of(f.integer))
class Ack:
    """The client received the results of these seqs; the dispatcher may forget them."""

    seqs: list


@_message(MsgType.STATUS_REQUEST, f.integer, f.boolean)
class StatusRequest:
    """Ask for the dispatcher's statistics; detail adds the executor table."""

    req_id: int
    detail: bool


@_message(MsgType.EVENTS_REQUEST, f.integer, f.integer, f.number, f.integer)
class EventsRequest:
    """Ask for the dispatcher's recent events numbered above after (and at or after wall time
    since), at most limit of them; answered by a StatusReply with the same req_id whose info
    holds events, next (the number to ask after next time), first (the oldest number kept)
    and dropped (events lost to the bounds), or error."""

    req_id: int
    after: int
    since: float
    limit: int


@_message(MsgType.RELEASE, f.list_of(f.string), f.string)
class Release:
    """Ask these executors (by id) to finish what they run and leave: the provisioner's
    way to shrink the fleet without killing work.  Unknown ids are ignored."""

    executor_ids: list
    reason: str


@_message(MsgType.FLEET_REPORT, f.plain_map)
class FleetReport:
    """The provisioner's view of the fleet, kept by the dispatcher for `falconet status`."""

    info: dict


@_message(MsgType.WELCOME, f.integer, f.string, f.plain_map)
class Welcome:
    """The dispatcher accepts a client; limits holds the batch and size limits."""

    version: int
    dispatcher_id: str
    limits: dict


@_message(MsgType.ACCEPTED, f.integer, f.integer)
class Accepted:
    """Every task of the batch is queued (invalid ones come back as failed results)."""

    batch: int
    count: int


@_message(MsgType.RESULTS, _task_results)
class Results:
    """Final outcomes of some of the client's tasks."""

    results: list


@_message(MsgType.STARTED, f.list_of(f.integer))
class Started:
    """These tasks of the client were handed to a slot: they can no longer be cancelled.
    One per client per turn, before that turn's Results; never sent again."""

    seqs: list


@_message(MsgType.STATUS_REPLY, f.integer, f.plain_map)
class StatusReply:
    """Statistics: see falconet.dispatcher.core.Core.status for the keys."""

    req_id: int
    info: dict


@_message(MsgType.REFUSED, f.string)
class Refused:
    """The peer's request was refused; reason says why and what to do."""

    reason: str


@_message(MsgType.HELLO_AGAIN, f.string)
class HelloAgain:
    """The dispatcher does not know this client (it restarted, or had no Hello): say Hello."""

    reason: str


@_message(
    MsgType.REGISTER,
    f.integer,
    f.string,
    f.string,
    f.list_of(f.string),
    f.integer,
    f.integer,
    f.string,
    f.integer,
    f.integer,
    f.plain_map,
    f.pairs,
)
class Register:
    """An executor joins; holding lists tasks it still runs from before a reconnect."""

    version: int
    executor_id: str
    hostname: str
    addresses: list
    cpus: int
    memory_mb: int  #: MB, as in task needs
    platform: str
    slots: int
    pid: int
    facts: dict  #: extra host facts, e.g. cloud instance id and type
    holding: list


@_message(MsgType.REPORT, f.integer, f.pairs, _exec_results, f.plain_map)
class Report:
    """Executor progress: more credit, tasks started, attempts finished; stats (such as
    the input cache's hits) only when they changed, else an empty map."""

    credit: int
    started: list
    results: list
    stats: dict = dataclasses.field(default_factory=dict)


@_message(MsgType.DRAIN, f.pairs)
class Drain:
    """The executor takes no more work; returned tasks were never started."""

    returned: list


@_message(MsgType.BYE)
class Bye:
    """The executor is leaving; every result it had has been sent."""


@_message(MsgType.REGISTERED, f.string, f.number, f.number, f.integer, f.integer)
class Registered:
    """The dispatcher accepts an executor and tells it the heartbeat rules and size limits.

    dispatcher_id changes when the dispatcher restarts: an executor that sees a new one
    abandons the work of the old one, whose task ids the new one may reuse.
    """

    dispatcher_id: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    max_message_bytes: int  #: the dispatcher disconnects an executor that sends more
    #: the dispatcher's --max-output-bytes: the executor fails a larger output in the slot,
    #: before it is copied out (protocol 8)
    max_output_bytes: int


@_message(MsgType.TASKS, _assignments)
class Tasks:
    """Work for an executor, never more than its outstanding credit."""

    tasks: list


@_message(MsgType.CANCEL_TASKS, f.list_of(f.integer))
class CancelTasks:
    """Drop these tasks if they have not started."""

    tids: list


@_message(MsgType.REREGISTER, f.string)
class Reregister:
    """The dispatcher does not know this executor: register again."""

    reason: str


@_message(MsgType.LEAVE, f.string)
class Leave:
    """Finish the running tasks, hand back the rest, and leave (as on SIGTERM)."""

    reason: str


@_message(MsgType.HEARTBEAT)
class Heartbeat:
    """A sign of life, sent when nothing else was sent for an interval."""


@_message(MsgType.PUT_BLOB, f.string, f.integer, f.integer, f.blob)
class PutBlob:
    """One chunk of a file for the dispatcher's blob store, in order from offset 0; the
    blob is stored once total bytes arrived and their sha256 is digest."""

    digest: str
    offset: int
    total: int
    data: bytes


@_message(MsgType.GET_BLOB, f.string, f.integer)
class GetBlob:
    """Send this blob from offset on, as BlobData chunks."""

    digest: str
    offset: int


@_message(MsgType.BLOB_DATA, f.string, f.integer, f.integer, f.blob, f.string)
class BlobData:
    """One chunk of a blob; error (with no data) when it cannot be sent or was not stored."""

    digest: str
    offset: int
    total: int
    data: bytes
    error: str


@_message(MsgType.DROP_BLOBS, f.list_of(f.string))
class DropBlobs:
    """The client no longer needs these blobs (inputs of finished tasks, fetched outputs)."""

    digests: list


BLOB_MESSAGES = frozenset({PutBlob, GetBlob, DropBlobs})
CLIENT_TO_DISPATCHER = frozenset({Hello, Submit, Cancel, Ack, StatusRequest, EventsRequest, Release, FleetReport,
                                  *BLOB_MESSAGES})
EXECUTOR_TO_DISPATCHER = frozenset({Register, Report, Drain, Bye, Heartbeat, PutBlob, GetBlob})
CLIENT_ONLY = CLIENT_TO_DISPATCHER - EXECUTOR_TO_DISPATCHER - BLOB_MESSAGES  #: refused on the executor port
EXECUTOR_ONLY = EXECUTOR_TO_DISPATCHER - CLIENT_TO_DISPATCHER  #: refused on the client port

# ---------------------------------------------------------------- codec

_packb = msgpack.Packer(use_bin_type=True).pack


def encode(msg: Any) -> bytes:
    """Encode one message as its msgpack frame (record batches column-wise)."""
    fields = [msg.TYPE, *[getattr(msg, n) for n in msg._names]]
    at = _COLUMNAR.get(msg.TYPE)
    if at is not None:
        i, n = at
        fields[i] = f.transpose(fields[i], n)
    return _packb(fields)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("msgpack extension types are not part of the protocol")


def _keeping_columns(tag: int) -> tuple[type, tuple]:
    cls, checks = _REGISTRY[tag]
    at = _COLUMNAR[tag][0] - 1  # the batch's checker (the type is not among the checks)
    return cls, (*checks[:at], checks[at].kept, *checks[at + 1:])


#: _REGISTRY with each record batch kept as its columns (fields.Columns)
_REGISTRY_COLUMNS = {**_REGISTRY, **{tag: _keeping_columns(tag) for tag in _COLUMNAR}}


def decode(frame: bytes, *, columns: bool = False) -> Any:
    """Decode one frame into its message object, or raise ProtocolError.  columns: record
    batches stay as the columns they travelled in (:class:`falconet.fields.Columns`, the
    same records to any reader), for a receiver that reads them a column at a time."""
    try:
        raw = msgpack.unpackb(frame, ext_hook=_reject_ext, use_list=True)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same
        raise ProtocolError(f"not a msgpack frame ({type(exc).__name__})") from None
    if type(raw) is not list or not raw or type(raw[0]) is not int:
        raise ProtocolError("a message is an array starting with its integer type")
    entry = (_REGISTRY_COLUMNS if columns else _REGISTRY).get(raw[0])
    if entry is None:
        raise ProtocolError(f"unknown message type {raw[0]}")
    cls, checks = entry
    if len(raw) != len(checks) + 1:
        raise ProtocolError(
            f"{cls.__name__} has {len(checks)} fields, got {len(raw) - 1}"
        )
    try:
        return cls(*[c(v) for c, v in zip(checks, raw[1:])])
    except ProtocolError as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}") from None


def check_version(version: int) -> str:
    """Return an empty string when compatible, else the refusal reason."""
    if version == PROTOCOL_VERSION:
        return ""
    return (
        f"protocol version {version} is not supported by this dispatcher "
        f"(it speaks {PROTOCOL_VERSION}); install the same falconet version on both sides"
    )


def wrong_port(here: str, other_port: str = "") -> str:
    """The Refused reason for a message that belongs on the other port; here is "client" or
    "executor", other_port the other port's number when known."""
    other = "executor" if here == "client" else "client"
    number = f", {other_port}" if other_port else ""
    return (f"{WRONG_PORT} the dispatcher's {here} port; {other}s connect to its {other} port{number} "
            f"(the '{other}:' line falconet dispatcher prints)")


def refusal_text(reason: str, address: str) -> str:
    """A Refused reason as a line for the user: a wrong-port refusal names the address used."""
    if reason.startswith(WRONG_PORT):
        return f"{address} is{reason[len(WRONG_PORT):]}"
    return reason
