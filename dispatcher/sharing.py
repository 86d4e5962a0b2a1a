"""Sharing one dispatcher between clients: the core's rules for whose plain task runs next
and for clients that stop reading or are gone (docs/reliability.md, "Sharing").

Part of the core (it changes the core's state through the core's own steps: _pop,
_finish, _ack); apart only so that each concern reads on its own.

- Fair shares: each client's plain tasks wait in its own queue; free slots go round the
  clients with queued work by deficit round robin, weighted by --client-weight.
- Back-pressure: a client over --max-unacked-mb of unacknowledged results is held.
- Gone clients: queued work cancelled after --client-timeout, results dropped after
  --result-expiry.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from falconet import protocol as p
from falconet.dispatcher.entries import ClientEntry, ExecutorEntry
from falconet.protocol import TaskState

if TYPE_CHECKING:
    from falconet.dispatcher.core import Core

log = logging.getLogger("falconet.dispatcher")

_PENDING, _DISPATCHED, _RUNNING = int(TaskState.PENDING), int(TaskState.DISPATCHED), int(TaskState.RUNNING)
_CANCELLED = int(TaskState.CANCELLED)


def share(core: Core, ex: ExecutorEntry, n: int) -> list[p.Assignment]:
    """Up to n tasks from the clients with queued work, by deficit round robin: each turn
    of a client adds n x its share of the weights to what it may take, so over time
    each gets free slots in proportion to its weight, whatever the others queued."""
    plain, batch = core.plain, []
    weights = sum([c.weight for c in plain.values()])
    while len(batch) < n and plain:
        client = next(iter(plain.values()))
        client.deficit += n * client.weight / weights
        part = core._pop(client.queue, ex, min(int(client.deficit), n - len(batch)), 1)
        client.deficit -= len(part)
        batch += part
        del plain[client.peer]
        if client.queue:
            plain[client.peer] = client  # to the back of the line, keeping what it may still take
        else:
            client.deficit = 0.0
    return batch


def hold(core: Core, client: ClientEntry) -> None:
    """Back-pressure: a client over max_unacked_bytes gets no more of its tasks run until
    it acknowledges (a client that stopped reading must not pin the dispatcher's memory)."""
    client.held = True
    core.plain.pop(client.peer, None)
    log.warning("client %s has %d MB of results it has not acknowledged (limit %d MB, "
                "--max-unacked-mb): its queued tasks wait until it reads them", client.label,
                client.unacked_bytes >> 20, core.config.max_unacked_bytes >> 20)

def check_clients(core: Core, now: float) -> None:
    """Cancel the queued tasks of clients silent for client_timeout_s; drop the results of
    those silent for result_expiry_s (and forget them when nothing of theirs is live)."""
    timeout, expiry = core.config.client_timeout_s, core.config.result_expiry_s
    for client in list(core.clients.values()):
        silent = now - client.last_seen
        if timeout and silent > timeout and client.counts[_PENDING]:
            cancel_queued(core, client, f"its client {client.label} was silent for {silent:.0f}s "
                                        f"(--client-timeout {timeout:g})")
        if expiry and silent > expiry and (client.unacked or client.results):
            log.warning("client %s silent for %.0fs: its %d unacknowledged results are dropped "
                        "(--result-expiry %g)", client.label, silent, len(client.unacked), expiry)
            core._ack(client, list(client.unacked))
            if not any(client.counts[s] for s in (_PENDING, _DISPATCHED, _RUNNING)) and not client.results:
                del core.clients[client.peer]
                core._results_pending.pop(client.peer, None)

def cancel_queued(core: Core, client: ClientEntry, reason: str) -> None:
    wall = core.wall()
    n = 0
    for task in client.queue:
        if task.state == _PENDING:
            core._finish(task, _CANCELLED, b"", reason, "", 0.0, wall)
            n += 1
    client.queue.clear()
    core.plain.pop(client.peer, None)
    for cls in core.classes.values():
        for task in cls.queue:
            if task.client is client and task.state == _PENDING:
                core._finish(task, _CANCELLED, b"", reason, "", 0.0, wall)
                cls.pending -= 1
                n += 1
    log.warning("%d queued tasks cancelled: %s", n, reason)
