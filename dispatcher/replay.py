"""Journal replay and snapshot: the dispatcher's state from its records, and back.

:func:`replay` rebuilds the client sessions and the accepted tasks still without a result;
the core then counts and queues those tasks (:meth:`Core.restore`).  :func:`snapshot` turns
the live state into the records compaction keeps.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from falconet import needs as nd
from falconet import protocol as p
from falconet.dispatcher.entries import ClientEntry, ExecutorEntry, Task
from falconet.dispatcher.records import Kind
from falconet.protocol import TaskState

log = logging.getLogger("falconet.dispatcher")

_PENDING = int(TaskState.PENDING)
_FINAL = frozenset({int(TaskState.DONE), int(TaskState.FAILED), int(TaskState.CANCELLED)})


def replay(records: Iterable[tuple[int, Any]], clients: dict[bytes, ClientEntry]) -> list[Task]:
    """Apply journal records to the client sessions (made as needed, unwelcomed); return the
    accepted tasks without a result, in the order they were accepted."""
    r = _Replay(clients)
    apply = {Kind.SUBMIT: r.submit, Kind.TASKS: r.tasks, Kind.RESULTS: r.results, Kind.ACK: r.ack,
             Kind.LOSSES: r.losses, Kind.CLIENT: r.client}
    for kind, fields in records:
        if kind in apply:
            apply[kind](fields)
        else:
            log.warning("journal: skipped a record of unknown kind %s", kind)
    return list(r.live.values())


class _Replay:
    """One replay's sessions and the tasks still live, by (client, seq)."""

    def __init__(self, clients: dict[bytes, ClientEntry]):
        self.clients = clients
        self.live: dict[tuple[bytes, int], Task] = {}

    def submit(self, f: list) -> None:
        client = self.known_client(f[0], f[1])
        client.first_time(f[2])
        for spec in f[4]:
            spec = p.TaskSpec._make(spec)
            self.live[(client.peer, spec.seq)] = Task(client, spec, f[3], restored_needs(spec.needs))

    def tasks(self, f: list) -> None:
        client = self.known_client(f[0], "")
        for seq, kind, body, retries, walltime_s, needs, files, submitted, losses in f[1]:
            spec = p.TaskSpec(seq, kind, body, retries, walltime_s, needs, files)
            t = self.live[(client.peer, seq)] = Task(client, spec, submitted, restored_needs(needs))
            t.losses = losses

    def results(self, f: list) -> None:
        client = self.known_client(f[0], "")
        for r in f[1]:
            self.live.pop((client.peer, r[0]), None)
            client.unacked[r[0]] = p.TaskResult._make(r)

    def ack(self, f: list) -> None:
        unacked = self.known_client(f[0], "").unacked
        for seq in f[1]:
            unacked.pop(seq, None)

    def losses(self, f: list) -> None:
        for seq, losses in f[1]:
            t = self.live.get((f[0], seq))
            if t is not None:
                t.losses = losses

    def client(self, f: list) -> None:
        client = self.known_client(f[0], f[1])
        client.batch_high = max(client.batch_high, f[2])
        client.batch_extra.update(b for b in f[3] if b > client.batch_high)

    def known_client(self, peer: bytes, name: str) -> ClientEntry:
        client = self.clients.get(peer)
        if client is None:
            client = self.clients[peer] = ClientEntry(peer, name, welcomed=False)
        elif name:
            client.name = client.label = name
        return client


def restored_needs(data: bytes) -> nd.Needs | None:
    """Needs of a journaled task (accepted, so valid when written); None for a plain one."""
    try:
        n = nd.decode(data)
    except p.ProtocolError:
        return None
    return None if n.plain else n


def snapshot(clients: Iterable[ClientEntry], executors: Iterable[ExecutorEntry],
             queues: Iterable[Iterable[Task]], chunks: Callable[[list, int], Iterable[list]]) -> Iterator[tuple[int, tuple]]:
    """The live state as journal records: what compaction keeps.  chunks splits a list of
    records into runs of bounded size (the core's limits)."""
    by_client: dict[ClientEntry, list[Task]] = collections.defaultdict(list)
    for ex in executors:  # dispatched before anything still queued
        for t in ex.tasks.values():
            if t.state not in _FINAL:
                by_client[t.client].append(t)
    for queue in queues:
        for t in queue:
            if t.state == _PENDING:
                by_client[t.client].append(t)
    for client in clients:
        yield Kind.CLIENT, (client.peer, client.name, client.batch_high, sorted(client.batch_extra))
        records = [(t.seq, t.kind, t.body, t.retries, t.walltime_s,
                    b"" if t.needs is None else nd.encode(t.needs), t.files, t.submitted, t.losses)
                   for t in by_client.get(client, [])]
        for part in chunks(records, 2):
            yield Kind.TASKS, (client.peer, part)
        for part in chunks([*client.unacked.values(), *client.results], 2):
            yield Kind.RESULTS, (client.peer, part)
