"""The client's side of staging: inputs it uploaded, outputs on their way to this machine.

Inputs (``inputs=[...]``) are uploaded to the dispatcher's blob store once per content,
ahead of the first task that names them, and released (DropBlobs) when the last
unfinished task that names them is over: :class:`InputRefs` counts them.

A task that asked for outputs here (``outputs=[...]`` naming a local path, or a command's
``stdout=``/``stderr=`` file) finishes at the dispatcher with its outputs in the blob store.
Its result is *held* until every such file is fetched (GetBlob / BlobData) and written where
the task asked; then it is released to resolve the future.  No sockets: the methods return
the GetBlob requests to send.
"""

from __future__ import annotations

import os
import shutil
from typing import NamedTuple

from falconet import protocol as p
from falconet import staging


class InputRefs:
    """Inputs uploaded to the dispatcher, counted by the unfinished tasks that name them."""

    def __init__(self) -> None:
        self._refs: dict[str, int] = {}  # sha256 -> unfinished tasks that need it

    def __contains__(self, digest: str) -> bool:
        """True while some unfinished task holds this input (it is at the dispatcher)."""
        return digest in self._refs

    def hold(self, digest: str, tasks: int) -> None:
        """These many more tasks name this input."""
        self._refs[digest] = self._refs.get(digest, 0) + tasks

    def release(self, digests: tuple[str, ...]) -> list[str]:
        """A task that named these inputs is over; returns those no task holds any more."""
        unneeded = []
        for d in digests:
            n = self._refs.get(d, 0) - 1
            if n <= 0:
                self._refs.pop(d, None)
                unneeded.append(d)
            else:
                self._refs[d] = n
        return unneeded


class Released(NamedTuple):
    """A held result whose files have all ended: resolve it, or fail it with error."""

    result: p.TaskResult
    error: str  #: why an output could not be fetched; '' when all arrived


class OutputFetches:
    """Held results, and the fetches of the output blobs they wait for."""

    def __init__(self) -> None:
        self.downloads = staging.Downloads()  # output blobs on their way here
        self.held: dict[int, list] = {}  #: seq -> [result, outputs still to fetch, error]
        self._waiting: dict[str, list[tuple[int, str]]] = {}  # output blob -> [(seq, destination)]

    def __contains__(self, seq: int) -> bool:
        return seq in self.held

    def __len__(self) -> int:
        """Blobs being fetched."""
        return len(self.downloads)

    def hold(self, r: p.TaskResult, fetch: set[tuple[str, str]], now: float) -> list[p.GetBlob]:
        """Hold r until each (blob, destination) in fetch is written; returns what to ask for."""
        self.held[r.seq] = [r, len(fetch), ""]
        asks = []
        for digest, dest in sorted(fetch):
            ask = self.downloads.begin(
                digest, lambda total, d=digest, to=dest: staging.BlobWriter(to, d, total), now)
            if ask is not None:
                asks.append(p.GetBlob(*ask))
            self._waiting.setdefault(digest, []).append((r.seq, dest))
        return asks

    def feed(self, msg: p.BlobData, now: float) -> tuple[list[p.GetBlob], list[str], list[Released]]:
        """One chunk: (requests to send, blobs the dispatcher may drop, results released)."""
        ended, ask, error = self.downloads.feed(msg.digest, msg.offset, msg.total, msg.data, msg.error, now)
        asks = [] if ask is None else [p.GetBlob(*ask)]
        if not ended:
            return asks, [], []
        waiting = self._waiting.pop(msg.digest)
        if not error:
            error = _copy_to_the_others(waiting)
        drops = [msg.digest] * len({seq for seq, _ in waiting})  # one release per result that held it
        released = []
        for seq, dest in waiting:
            held = self.held.get(seq)
            if held is None:
                continue
            held[1] -= 1
            if error and not held[2]:
                held[2] = f"output for {dest} could not be fetched from the dispatcher: {error}"
            if held[1] <= 0:
                del self.held[seq]
                released.append(Released(held[0], held[2]))
        return asks, drops, released

    def again(self, now: float, only_stalled: bool) -> list[p.GetBlob]:
        """Ask again, from 0, for outputs whose fetch stalled (or all, after a Welcome)."""
        return [p.GetBlob(*ask) for ask in self.downloads.again(now, only_stalled)]

    def abort_all(self) -> list[str]:
        """Drop every partial file and every held result; returns the blobs to release."""
        self.held.clear()
        drops = []
        for digest in self.downloads.abort_all():
            drops += [digest] * len({seq for seq, _ in self._waiting.pop(digest)})
        return drops


def _copy_to_the_others(waiting: list[tuple[int, str]]) -> str:
    """The same content asked for in several places: copy the first file; '' or the error."""
    try:
        first = waiting[0][1]
        for _, dest in waiting[1:]:
            if dest != first:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(first, dest)
    except OSError as exc:
        return str(exc)
    return ""
