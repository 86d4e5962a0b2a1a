"""The executor's pull rules, without I/O: credit, chunking, pipelining, leaving, timers.

:class:`Pull` is driven by events: a message from the dispatcher, results or the death of
a slot, an input fetched, a signal.  It reads time from an injected monotonic clock and
answers with actions: send this message, run this chunk on slot N, kill slot N, upload
these outputs...  ``executor/agent.py`` owns the socket, the poller and the slot
processes, feeds the events in and carries the actions out, as ``dispatcher/server.py``
does for ``dispatcher/core.py``.  Each loop turn is::

    pull.on_...(...)        # every event of the turn, in the order it came
    apply(pull.turn())      # wall times, drain, feed slots, registration, heartbeat, idleness
    apply(pull.flush())     # outputs to upload, then Reports (credit + starts + results)
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from falconet import protocol as p
from falconet import tasks
from falconet.executor.pipes import EXEC_RESULT_FIELDS, SlotResult, SlotTask

log = logging.getLogger("falconet.executor")

_FAILED, _CANCELLED = int(p.TaskState.FAILED), int(p.TaskState.CANCELLED)
_COMMAND = int(p.TaskKind.COMMAND)
CHUNK_WORK_S = 0.02  # work per chunk handed to a slot
BACKLOG_WORK_S = 0.05  # work held locally beyond the slots
MAX_CHUNK = 64
MAX_BACKLOG = 1024
MAX_REPORT = 4096  # results per Report message
#: a Report of starts alone waits this long for a result to ride with (see _hold_started)
START_HOLD_S = 0.002
PIPELINE_BELOW_S = 0.05  # mean task time under which slots get their next chunk early
OVERDUE_MIN_S, OVERDUE_MEANS = 0.2, 20  # a task running longer than both is overdue
COMMAND_GRACE_S = 5.0  # a command's own slot enforces its wall time; this is the backstop
FIRST_COMPLAINT_S = 5.0  # not registered after this long: say why in the log...
COMPLAINT_EVERY_S = 30.0  # ...and again this often while it lasts
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 5.0  # between registration attempts
# Fields of a SlotResult record as it comes out of the pipe (a list: indexed, not rebuilt)
_FILES, _CACHE, _UPLOADS = (SlotResult._fields.index(f) for f in ("files", "cache", "uploads"))


class Phase(enum.Enum):
    """Where the executor is in its life."""

    ACTIVE = "active"  #: taking and running work (registered or trying to be)
    DRAINING = "draining"  #: finishing what runs; handed the rest back
    DONE = "done"  #: leaving the loop


# ---------------------------------------------------------------- actions


class Send(NamedTuple):
    """Send this message to the dispatcher; a Report that could not go back to Pull.unsent."""

    msg: Any


class Run(NamedTuple):
    """Write this chunk to slot `slot`; if the pipe is broken, replace the slot and call
    Pull.on_run_failed."""

    slot: int
    tasks: list[tuple]  #: SlotTask records; plain tuples of its fields for chunks (speed)


class Reclaim(NamedTuple):
    """Ask slot `slot` for the tasks it holds behind its overdue one (RECLAIM_SIGNAL); it
    answers with Pull.on_handed_back."""

    slot: int


class Kill(NamedTuple):
    """Kill slot `slot` with its task's process group and start a fresh one."""

    slot: int
    why: str


class Upload(NamedTuple):
    """Send the outbox files of result `tid` to the dispatcher's blob store, then call
    Pull.uploaded (or Pull.upload_failed when a file cannot be read back)."""

    tid: int
    files: bytes


class ClearOutbox(NamedTuple):
    """Remove the outbox files of a result that will never be sent."""

    files: bytes


class AbortFetches(NamedTuple):
    """Stop every input download under way: the tasks that wanted them are dropped."""

    why: str


class Refetch(NamedTuple):
    """Ask again, from offset 0, for every input under way (chunks in flight were lost)."""

    why: str


class Joined(NamedTuple):
    """Registered after being unregistered: the link's old events no longer matter."""

    dispatcher_id: str


class Complain(NamedTuple):
    """Still unregistered: say why in the log (and reconnect if libzmq gave up)."""

    since_s: float


Action = Send | Run | Reclaim | Kill | Upload | ClearOutbox | AbortFetches | Refetch | Joined | Complain


class Inputs(NamedTuple):
    """What a task with files waits for, as the agent found it in the input cache."""

    missing: frozenset[str]  #: blobs not in the cache yet
    prefetched: list[str]  #: those whose download this task started (its cache misses)


class SlotState:
    """The chunk a slot was handed, in order, when its current task started, and whether a
    Reclaim sent to it waits for its answer."""

    __slots__ = ("chunk", "sent_at", "reclaiming")

    def __init__(self) -> None:
        self.chunk: dict[int, p.Assignment] = {}
        self.sent_at = 0.0
        self.reclaiming = False

    def clear(self) -> list[p.Assignment]:
        """Forget the chunk (the slot process is being replaced); return it, in order."""
        chunk = list(self.chunk.values())
        self.chunk, self.reclaiming = {}, False
        return chunk

    @property
    def cpus(self) -> int:
        """cpus held by the task it runs: chunks are of one-cpu tasks, others go alone."""
        for a in self.chunk.values():
            return a.cpus
        return 0


# ---------------------------------------------------------------- the rules


class Pull:
    """An executor's tasks, credit and timers; events in, actions out."""

    def __init__(self, slots: int, cpus: int, register: p.Register, *, prefetch: int | None = None,
                 idle_timeout_s: float = 0.0, dispatcher_url: str = "", ends_at: float = 0.0,
                 end_margin_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        """register: this executor's Register message (its holding is filled in when sent);
        dispatcher_url: for log lines; ends_at: the epoch time this executor's allocation
        ends (a batch job's walltime; 0: never), before which it stops taking work by
        end_margin_s, so that no task is killed by the end; clock: monotonic seconds, for
        every rule of time; wall: the epoch time of failures and of ends_at."""
        self.dispatcher_url = dispatcher_url
        self.slots = [SlotState() for _ in range(slots)]
        self.cpus = cpus
        self.register_msg = register
        self.prefetch = prefetch
        self.idle_timeout_s = idle_timeout_s
        self.ends_at, self.end_margin_s = ends_at, end_margin_s
        self.clock, self.wall = clock, wall
        self.queue: collections.deque[p.Assignment] = collections.deque()
        self.staged: dict[int, tuple[p.Assignment, set[str]]] = {}  #: tid -> (task, blobs it waits for)
        self.prefetched: dict[int, list[str]] = {}  #: tid -> blobs fetched for it (cache misses)
        self.started: list[tuple[int, int]] = []  #: handed to a slot, not yet reported
        self.started_since = 0.0  #: when a Report of starts alone was first held back (0: none is)
        self.results: list[p.ExecResult] = []  #: finished, not yet reported
        self.to_upload: dict[int, bytes] = {}  #: tid -> files of a result in self.results still in the outbox
        self.cache_counts = {"hits": 0, "misses": 0, "bytes_fetched": 0}
        self.cache_reported: dict | None = {}
        self.phase = Phase.ACTIVE
        self.exit_code = 0
        self.left_idle = False  #: it left because it had no work for idle_timeout_s
        self.registered = False
        self.session = ""  #: the dispatcher_id of the dispatcher we registered with
        self.asked = 0  #: credit given and not yet used by the dispatcher
        self.mean_s: float | None = None  #: moving mean of task run times
        self.heartbeat_interval_s, self.heartbeat_timeout_s = 1.0, 10.0
        self.max_message_bytes = 256 << 20
        self.slot_extra: tuple = ([], 64 << 20)  #: SlotTask's (prefetched, max_output) for a plain task
        now = clock()
        self.heard = self.spoke = self.last_busy = now
        self.next_register, self.backoff_s = now, FIRST_BACKOFF_S
        self.unregistered_since, self.next_complaint = now, now + FIRST_COMPLAINT_S
        self.drain_requested = self.stop_requested = False
        self.out: list[Action] = []

    @property
    def done(self) -> bool:
        """The loop should end: drained, refused, or stopped."""
        return self.phase is Phase.DONE or self.stop_requested

    def take_actions(self) -> list[Action]:
        """Return and clear the actions produced so far, in order."""
        out, self.out = self.out, []
        return out

    # ------------------------------------------------------------ signals

    def request_drain(self) -> None:
        """SIGTERM: finish running tasks, hand back the rest, leave.  A second one stops now."""
        if self.drain_requested:
            self.stop_requested = True
        self.drain_requested = True

    def request_stop(self) -> None:
        """Stop now: kill running tasks and leave (whoever wanted their results is gone)."""
        self.drain_requested = self.stop_requested = True

    # ------------------------------------------------------------ dispatcher events

    def heard_from_dispatcher(self) -> None:
        """A frame arrived, even one that could not be decoded: the dispatcher is alive."""
        self.heard = self.clock()

    def on_message(self, msg: Any, inputs: dict[int, Inputs | str] | None = None) -> None:
        """One decoded message from the dispatcher.  inputs: for the tasks with files of a
        Tasks message, what each waits for, or why its files cannot be read."""
        self.heard = self.clock()
        kind = type(msg)
        if kind is p.Tasks:
            self._on_tasks(msg.tasks, inputs or {})
        elif kind is p.Registered:
            self._on_registered(msg)
        elif kind is p.CancelTasks:
            self._cancel(set(msg.tids))
        elif kind is p.Reregister:
            log.info("dispatcher asks to register again: %s", msg.reason)
            self._abandon_work("the dispatcher no longer counts this executor's tasks as ours")
            self._unregistered(self.heard)
        elif kind is p.Leave:
            if self.phase is Phase.ACTIVE:
                self._begin_drain(f"released by the dispatcher: {msg.reason}")
        elif kind is p.Refused:
            self._on_refused(msg.reason)
        elif kind is not p.Heartbeat:
            log.warning("ignored %s: not a message for executors", kind.__name__)

    def _on_tasks(self, tasks: list[p.Assignment], inputs: dict[int, Inputs | str]) -> None:
        self.asked = max(0, self.asked - len(tasks))
        if self.phase is Phase.DRAINING:
            self._send(p.Drain([(a.tid, a.attempt) for a in tasks]))
            return
        for a in tasks:
            need = inputs.get(a.tid) if a.files else None
            if need is None:
                self.queue.append(a)
            elif type(need) is str:
                self._fail(a, need)
            elif not need.missing:
                self.queue.append(a)
            else:
                self.staged[a.tid] = (a, set(need.missing))
                self.prefetched[a.tid] = need.prefetched

    def _on_registered(self, msg: p.Registered) -> None:
        if self.session and msg.dispatcher_id != self.session:
            self._abandon_work("the dispatcher restarted")
        self.session = msg.dispatcher_id
        if not self.registered:
            self.out.append(Joined(msg.dispatcher_id))
        self.registered, self.asked, self.backoff_s = True, 0, FIRST_BACKOFF_S
        self.out.append(Refetch("chunks in flight before were lost with the link"))
        self.heartbeat_interval_s = msg.heartbeat_interval_s
        self.heartbeat_timeout_s = msg.heartbeat_timeout_s
        self.max_message_bytes = msg.max_message_bytes
        self.slot_extra = ([], msg.max_output_bytes)

    def _on_refused(self, reason: str) -> None:
        if reason.startswith(p.WRONG_PORT):
            log.error("%s", p.refusal_text(reason, self.dispatcher_url))
        else:
            log.error("the dispatcher refused this executor: %s", reason)
        self.exit_code, self.phase = 1, Phase.DONE

    def _abandon_work(self, why: str) -> None:
        """Drop every task held: the dispatcher has requeued them, or forgotten them.

        Reregister means we were declared lost (our tasks run elsewhere now); a new
        dispatcher_id means a restart, and the new dispatcher may reuse task ids, so a late
        result of the old run could be taken for a new task's.  Queued tasks and unsent
        results are dropped and the slots still running such work are killed.
        """
        busy = [i for i, s in enumerate(self.slots) if s.chunk]
        n = len(self.queue) + len(self.results) + sum(len(self.slots[i].chunk) for i in busy) + len(self.staged)
        if not n:
            return
        log.warning("%s; abandoning the %d tasks held", why, n)
        self.queue.clear()
        self.staged.clear()
        self.prefetched.clear()
        self.out.append(AbortFetches(why))
        self.out.extend(ClearOutbox(files) for files in self.to_upload.values())  # never to be sent
        self.to_upload.clear()
        self.results.clear()
        self.started.clear()
        for i in busy:
            self.slots[i].clear()
            self.out.append(Kill(i, "abandoning a restarted dispatcher's work"))

    def _cancel(self, tids: set[int]) -> None:
        now = self.wall()
        kept: collections.deque[p.Assignment] = collections.deque()
        for a in [*self.queue, *(a for a, _ in self.staged.values())]:
            if a.tid in tids:
                self.staged.pop(a.tid, None)
                self.prefetched.pop(a.tid, None)
                self.results.append(p.ExecResult(a.tid, a.attempt, _CANCELLED, b"", "cancelled before it started",
                                                 0.0, now, b""))
            elif a.tid not in self.staged:
                kept.append(a)
        self.queue = kept

    # ------------------------------------------------------------ slot and staging events

    def on_slot_results(self, index: int, records: list[list]) -> None:
        """A frame of SlotResult records from slot `index`, in the order its tasks ran."""
        slot = self.slots[index]
        chunk, results = slot.chunk, self.results
        if self.drain_requested:
            records = self._killed_with_the_job(chunk, records)
        mean = self.mean_s
        for r in records:
            tid = r[0]
            chunk.pop(tid, None)
            if r[_CACHE] is not None:  # a staged task's input cache counts
                for k, v in r[_CACHE].items():
                    self.cache_counts[k] = self.cache_counts.get(k, 0) + v
            if r[_UPLOADS]:
                self.to_upload[tid] = r[_FILES]
            result = p.ExecResult._make(r[:EXEC_RESULT_FIELDS])
            results.append(result)
            took = max(result.finished - result.started, 0.0)
            mean = took if mean is None else 0.9 * mean + 0.1 * took
        self.mean_s = mean
        # The next task of the chunk started about now; but results a slot sends with its
        # answer to a Reclaim are of tasks before its overdue one, which still runs.
        if not slot.reclaiming:
            slot.sent_at = self.clock()

    def _killed_with_the_job(self, chunk: dict[int, p.Assignment], records: list[list]) -> list[list]:
        """The records left once commands killed by SIGTERM while this executor was told
        to leave by one are handed back: a batch system ending the job signals every
        process of it, the commands too, and they did not fail of their own."""
        back, kept = [], []
        for r in records:
            a = chunk.get(r[0])
            if (a is not None and a.kind == _COMMAND and r[2] == _FAILED and r[3]
                    and tasks.decode_command_output(r[3])[0] == -signal.SIGTERM):
                chunk.pop(r[0])
                back.append(a)
            else:
                kept.append(r)
        if back:
            log.info("handing back %d commands killed by SIGTERM with this executor's job", len(back))
            self._hand_back(back)
        return kept

    def _hand_back(self, assignments: list[p.Assignment]) -> None:
        """Give tasks killed with this executor's job back to the dispatcher, unfailed."""
        if self.phase is Phase.ACTIVE:
            self.queue.extendleft(reversed(assignments))  # the drain about to begin hands them back
        else:
            self._send(p.Drain([(a.tid, a.attempt) for a in assignments]))

    def on_slot_died(self, index: int, code: int | None) -> None:
        """Slot `index` ended by itself (exit status `code`) and was replaced: its first task
        fails, the rest of its chunk goes back to the front of the queue.

        A slot ended by SIGTERM while this executor was told to leave by one too is another
        matter: a batch system ending the job (scancel, a walltime) signals every process
        of it.  Its tasks did nothing wrong: they all go back to the dispatcher."""
        chunk = self.slots[index].clear()
        if chunk and self.drain_requested and code in (-signal.SIGTERM, 128 + signal.SIGTERM):
            self._hand_back(chunk)
            return
        if chunk:
            how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            self._fail(chunk[0], f"the slot process running this task died ({how})")
            self.queue.extendleft(reversed(chunk[1:]))

    def on_run_failed(self, run: Run, code: int | None) -> None:
        """The chunk of `run` could not be written (its slot had died; it was replaced):
        the chunk goes back to the front of the queue, unstarted."""
        tasks = [SlotTask._make(t) for t in run.tasks]
        sent = {t.tid for t in tasks}
        self.started = [s for s in self.started if s[0] not in sent]
        slot = self.slots[run.slot]
        unsent = [a for tid, a in slot.chunk.items() if tid in sent]
        slot.chunk = {tid: a for tid, a in slot.chunk.items() if tid not in sent}
        self.on_slot_died(run.slot, code)  # what it ran before died with it
        for t in tasks:
            if t.prefetched:
                self.prefetched[t.tid] = t.prefetched
        self.queue.extendleft(reversed(unsent))

    def on_handed_back(self, index: int, tids: list[int], running_s: float) -> None:
        """Slot `index` answered a Reclaim: it will not run these tasks (maybe none); they go
        back to the front of the queue, in order, for the next free slot.  Its task has run
        for running_s."""
        slot = self.slots[index]
        slot.reclaiming = False
        slot.sent_at = self.clock() - running_s
        back = [slot.chunk.pop(tid) for tid in tids if tid in slot.chunk]
        if back:
            log.debug("slot %d handed back %d tasks queued behind its overdue one", index, len(back))
            self.queue.extendleft(reversed(back))

    def on_inputs(self, digest: str, error: str) -> None:
        """A download ended: release the tasks waiting for it, or fail them with `error`."""
        for tid, (a, missing) in list(self.staged.items()):
            if digest not in missing:
                continue
            if error:
                del self.staged[tid]
                self.prefetched.pop(tid, None)
                self._fail(a, error)
                continue
            missing.discard(digest)
            if not missing:
                del self.staged[tid]
                self.queue.append(a)

    def uploaded(self, tid: int, files: bytes) -> None:
        """Result `tid`'s outputs are in the dispatcher's blob store; files no longer name paths."""
        del self.to_upload[tid]
        self._replace_result(tid, files=files)

    def upload_failed(self, tid: int, reason: str) -> None:
        """Result `tid`'s outputs could not be read back for sending: it fails."""
        del self.to_upload[tid]
        self._replace_result(tid, state=_FAILED, files=b"", reason=reason)

    def _replace_result(self, tid: int, **fields: Any) -> None:
        for i, r in enumerate(self.results):
            if r.tid == tid:
                self.results[i] = r._replace(**fields)
                return

    def unsent(self, msg: Any) -> None:
        """A Report that could not be sent (no connection): keep what it carried for later.

        The agent hands back the failed Reports of one flush in order, before any new event,
        when flush has emptied the lists: so appending keeps the order."""
        if type(msg) is not p.Report:
            return
        self.started += msg.started
        self.results += msg.results
        self.asked -= msg.credit
        if msg.stats:
            self.cache_reported = None

    # ------------------------------------------------------------ the turn

    def turn(self) -> list[Action]:
        """The rules of one loop turn, after its events: wall times, a requested drain,
        feeding slots, registration and heartbeat, leaving when idle or drained."""
        now = self.clock()
        self._enforce_walltime(now)
        self._reclaim_overdue(now)
        if self.drain_requested and self.phase is Phase.ACTIVE:
            self._begin_drain("asked to stop")
        self._feed_slots(now)
        self._housekeeping(now)
        return self.take_actions()

    def _enforce_walltime(self, now: float) -> None:
        for i, slot in enumerate(self.slots):
            if not slot.chunk:
                continue
            a = next(iter(slot.chunk.values()))
            if a.walltime_s <= 0:
                continue
            limit = a.walltime_s + (COMMAND_GRACE_S if a.kind == p.TaskKind.COMMAND else 0.0)
            if now - slot.sent_at > limit:
                rest = slot.clear()[1:]
                self.out.append(Kill(i, "a task ran past its wall time"))
                self._fail(a, f"wall time of {a.walltime_s:g}s exceeded; the slot running it was killed")
                self.queue.extendleft(reversed(rest))

    def overdue_s(self) -> float:
        """How long a task runs before the tasks queued behind it in its slot are taken back."""
        return max(OVERDUE_MIN_S, OVERDUE_MEANS * (self.mean_s or 0.0))

    def _reclaim_overdue(self, now: float) -> None:
        """Tasks wait behind an overdue one in its slot: ask for them back, to run elsewhere.

        Chunks and pipelining assume tasks as short as the mean; one much longer would hold
        the rest of its chunk, and the chunk sent ahead, while other slots idle.
        """
        overdue = self.overdue_s()
        for i, slot in enumerate(self.slots):
            if len(slot.chunk) > 1 and not slot.reclaiming and now - slot.sent_at > overdue:
                slot.reclaiming = True
                self.out.append(Reclaim(i))

    def chunk_size(self) -> int:
        """Tasks per chunk: about CHUNK_WORK_S of work, shared fairly among the slots."""
        if self.mean_s is None:
            return 1
        n = min(MAX_CHUNK, max(1, int(CHUNK_WORK_S / max(self.mean_s, 1e-7))))
        return min(n, math.ceil(len(self.queue) / len(self.slots)))

    def _feed_slots(self, now: float) -> None:
        queue = self.queue
        # Short tasks: hand a slot its next chunk while it runs its last task, so it never
        # waits for this loop between tasks.  Long ones: a slot takes work only when free,
        # so work is not tied to a busy slot while another frees up.
        pipeline = self.mean_s is not None and self.mean_s < PIPELINE_BELOW_S
        overdue = self.overdue_s()
        slots = self.slots
        used = sum(s.cpus for s in slots)
        # Idle slots first: a task must not wait behind a running one while a slot is free.
        order = [i for i, s in enumerate(slots) if not s.chunk]
        if pipeline and len(order) < len(slots):  # not to a slot whose task is overdue
            order += [i for i, s in enumerate(slots)
                      if s.chunk and not s.reclaiming and now - s.sent_at <= overdue]
        for i in order:
            slot = slots[i]
            if not queue:
                return
            head = queue[0]
            # Multi-cpu, staged and wall-time tasks go alone, and never wait behind another
            # task in a slot (a wall-time clock starts when the task is handed over).
            alone = head.cpus > 1 or bool(head.files) or head.walltime_s > 0
            if slot.chunk and (alone or slot.cpus > 1 or not (pipeline and len(slot.chunk) == 1)):
                continue
            if not slot.chunk:
                # Packing by cpus, first come first served: a task waits for its cpus and
                # nothing behind it overtakes it, so a large task cannot starve here.
                room = self.cpus if head.cpus > 1 else max(self.cpus, len(self.slots))
                if used + head.cpus > room:
                    return
                used += head.cpus
                slot.sent_at = now
            self._hand(i, slot, alone)

    def _hand(self, i: int, slot: SlotState, alone: bool) -> None:
        """Take the next chunk off the queue for slot i."""
        queue = self.queue
        if alone:
            a = queue.popleft()
            chunk = [a]
            tasks = [SlotTask(*a, self.prefetched.pop(a.tid, []), self.slot_extra[1])]
        else:
            size = self.chunk_size()
            chunk = [queue.popleft()]
            if chunk[0].walltime_s == 0:  # wall-time tasks go alone, so the clock is exact
                while len(chunk) < size and queue and queue[0].walltime_s == 0 and _plain(queue[0]):
                    chunk.append(queue.popleft())
            extra = self.slot_extra  # (prefetched, max_output): shared, only sent
            tasks = [a + extra for a in chunk]  # SlotTask's fields: a NamedTuple costs 4x more
        slot.chunk.update((a.tid, a) for a in chunk)
        self.started += [(a.tid, a.attempt) for a in chunk]
        self.out.append(Run(i, tasks))

    def _housekeeping(self, now: float) -> None:
        if self.phase is Phase.DONE:
            return
        if self.registered and now - self.heard > self.heartbeat_timeout_s:
            log.warning("no word from the dispatcher for %.1fs; registering again", now - self.heard)
            self._unregistered(now)
        if not self.registered and now >= self.next_complaint:
            self.next_complaint = now + COMPLAINT_EVERY_S
            self.out.append(Complain(now - self.unregistered_since))
        if not self.registered and now >= self.next_register:
            self._send(dataclasses.replace(self.register_msg, holding=self.holding()))
            self.next_register = now + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)
        elif self.registered and now - self.spoke >= self.heartbeat_interval_s:
            self._send(p.Heartbeat())
        if self.ends_at and self.phase is Phase.ACTIVE and self.wall() >= self.ends_at - self.end_margin_s:
            # Running tasks finish, queued ones go back: the walltime kills nothing of ours.
            end = time.strftime("%H:%M:%S", time.localtime(self.ends_at))
            self._begin_drain(f"its allocation ends at {end}, in {self.ends_at - self.wall():.0f}s")
        if self.busy():
            self.last_busy = now
        elif self.phase is Phase.DRAINING:
            if self.registered:
                self._send(p.Bye())
            self.phase = Phase.DONE
        elif self.idle_timeout_s and now - self.last_busy > self.idle_timeout_s:
            self.left_idle = True
            self._begin_drain(f"idle for {self.idle_timeout_s:g}s")

    def busy(self) -> bool:
        """Whether it holds any task: queued, waiting for inputs, running, or unreported."""
        return bool(self.queue or self.results or self.staged or any(s.chunk for s in self.slots))

    def _unregistered(self, now: float) -> None:
        """Registration is lost: register again now, and complain if it takes long."""
        self.registered, self.next_register = False, now
        self.unregistered_since, self.next_complaint = now, now + FIRST_COMPLAINT_S

    def _begin_drain(self, why: str) -> None:
        log.info("executor %s leaving (%s): finishing %d running tasks, handing back %d",
                 self.register_msg.executor_id, why, sum(len(s.chunk) for s in self.slots), len(self.queue))
        self.phase = Phase.DRAINING
        returned = [(a.tid, a.attempt) for a in self.queue]
        returned += [(a.tid, a.attempt) for a, _ in self.staged.values()]
        self.queue.clear()
        self.staged.clear()
        self.prefetched.clear()
        self._send(p.Drain(returned))

    def holding(self) -> list[tuple[int, int]]:
        """Every attempt held: queued, waiting for inputs, running, finished but unreported."""
        held = [(a.tid, a.attempt) for a in self.queue]
        held += [(a.tid, a.attempt) for a, _ in self.staged.values()]
        for slot in self.slots:
            held += [(a.tid, a.attempt) for a in slot.chunk.values()]
        held += [(r.tid, r.attempt) for r in self.results]
        return held

    def _send(self, msg: Any) -> None:
        self.out.append(Send(msg))
        self.spoke = self.clock()

    def note_spoke(self) -> None:
        """The agent sent a message of its own (blob traffic): no heartbeat is needed."""
        self.spoke = self.clock()

    def _fail(self, a: p.Assignment, reason: str) -> None:
        now = self.wall()
        self.results.append(p.ExecResult(a.tid, a.attempt, _FAILED, b"", reason, now, now, b""))

    # ------------------------------------------------------------ reports

    def flush(self) -> list[Action]:
        """Outputs to upload first; once none waits, Reports of credit, starts and results."""
        if not self.registered:
            return self.take_actions()
        if self.to_upload:
            self.out.extend(Upload(tid, files) for tid, files in self.to_upload.items())
            return self.take_actions()
        credit = self.credit_to_ask()
        stats = self._stats()
        if self.started and not (self.results or credit or stats) and self._hold_started():
            return self.take_actions()
        self.started_since = 0.0
        while self.started or self.results or credit or stats:
            n = self.report_size()
            self._send(p.Report(credit, self.started, self.results[:n], stats))
            self.asked += credit
            if stats:
                self.cache_reported = stats["cache"]
            self.started, self.results, credit, stats = [], self.results[n:], 0, {}
        return self.take_actions()

    def _hold_started(self) -> bool:
        """Keep a Report of starts alone back for START_HOLD_S: a short task's result then
        carries its start, which saves a message each way, a dispatcher turn and the
        client's Started (the dispatcher tells no Started for a task that ended)."""
        now = self.clock()
        if not self.started_since:
            self.started_since = now
        return now < self.started_since + START_HOLD_S

    def report_due_in(self) -> float | None:
        """Seconds until held starts must be reported (None: none held)."""
        if not self.started_since:
            return None
        return max(0.0, self.started_since + START_HOLD_S - self.clock())

    def _stats(self) -> dict:
        """The input cache's counts, when they changed since the last report."""
        if self.cache_counts == self.cache_reported:
            return {}
        return {"cache": dict(self.cache_counts)}

    def report_size(self) -> int:
        """How many results fit one Report under the dispatcher's message limit.

        A single result too large for any message is replaced by a failure saying so;
        sent as it is, it would get this executor disconnected again and again.
        """
        budget = p.record_budget(self.max_message_bytes)
        size = 0
        for i, r in enumerate(self.results[:MAX_REPORT]):
            n = len(r.output) + len(r.reason) + p.RECORD_OVERHEAD
            if n > budget:
                why = (f"the result of {len(r.output)} bytes is larger than the dispatcher "
                       f"accepts ({budget} bytes); return less, or write it to a file")
                self.results[i] = r._replace(state=_FAILED, output=b"", reason=why)
                n = len(why) + p.RECORD_OVERHEAD
            if size + n > budget and i:
                return i
            size += n
        return min(len(self.results), MAX_REPORT)

    def credit_to_ask(self) -> int:
        """More tasks to ask for: up to the target, in steps worth a message."""
        if self.phase is not Phase.ACTIVE:
            return 0
        held = len(self.queue) + len(self.staged) + sum(len(s.chunk) for s in self.slots)
        target = self.target()
        deficit = target - held - self.asked
        if deficit <= 0:
            return 0
        if self.results or deficit * 4 >= target:  # piggyback, or worth a message of its own
            return deficit
        return 0

    def target(self) -> int:
        """Tasks to hold: the slots plus a prefetch of about BACKLOG_WORK_S of work."""
        n = len(self.slots)
        if self.prefetch is not None:
            return n + self.prefetch
        if self.mean_s is None:
            return 2 * n
        backlog = math.ceil(n / max(self.mean_s, 1e-6) * BACKLOG_WORK_S)
        return n + min(backlog, MAX_BACKLOG)


def _plain(a: p.Assignment) -> bool:
    """One cpu and no files: may share a chunk with others."""
    return a.cpus == 1 and not a.files
