"""The executor's pull rules (executor/pull.py), driven directly: no sockets, no slot
processes, a hand-moved clock.  Examples first, then hypothesis properties over random
runs against a model dispatcher that honours credit and model slots."""

from __future__ import annotations

import dataclasses
import os
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import protocol as p
from falconet import tasks
from falconet.executor import pipes, slot
from falconet.executor import pull as pl
from falconet.executor.pipes import EXEC_RESULT_FIELDS, SlotResult, SlotTask
from falconet.executor.pull import Phase, Pull

WALL = 1_700_000_000.0
OUTPUT_LIMIT = 1 << 20  # Registered.max_output_bytes
DONE, FAILED, CANCELLED = int(p.TaskState.DONE), int(p.TaskState.FAILED), int(p.TaskState.CANCELLED)
COMMAND, PYTHON = int(p.TaskKind.COMMAND), int(p.TaskKind.PYTHON)
REGISTER = p.Register(p.PROTOCOL_VERSION, "ex-1", "host-1", ["192.0.2.7"], 2, 4096, "linux-x86_64",
                      2, 4242, {}, [])


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(slots: int = 2, cpus: int | None = None, *, register: bool = True, max_message_bytes: int = 256 << 20,
         **kw) -> tuple[Pull, Clock]:
    clock = Clock()
    pull = Pull(slots, cpus or slots, dataclasses.replace(REGISTER, slots=slots), clock=clock,
                wall=lambda: WALL, **kw)
    if register:
        pull.turn()
        pull.on_message(p.Registered("disp-1", 1.0, 10.0, max_message_bytes, OUTPUT_LIMIT))
        pull.take_actions()
    return pull, clock


def task(tid: int, *, attempt: int = 1, kind: int = COMMAND, walltime_s: float = 0.0, cpus: int = 1,
         files: bytes = b"") -> p.Assignment:
    return p.Assignment(tid, attempt, kind, b"body", walltime_s, cpus, files)


def result(t: tuple, *, state: int = DONE, took: float = 0.001, output: bytes = b"",
           files: bytes = b"", cache: dict | None = None, uploads: bool = False) -> list:
    """The SlotResult of task t (a SlotTask's fields) as it comes out of the pipe: a list."""
    t = SlotTask._make(t)
    return list(SlotResult(t.tid, t.attempt, state, output, "", 1024.0, 1024.0 + took, files, cache, uploads))


def of(actions: list, kind: type) -> list:
    return [a for a in actions if type(a) is kind]


def sent(actions: list, kind: type) -> list:
    return [a.msg for a in actions if type(a) is pl.Send and type(a.msg) is kind]


def tids(run: pl.Run) -> list[int]:
    return [SlotTask._make(t).tid for t in run.tasks]


def turn(pull: Pull) -> list:
    return pull.turn() + pull.flush()


# ---------------------------------------------------------------- slot records


def test_slot_records_extend_the_protocol_records_they_carry():
    assert SlotTask._fields[:-2] == p.Assignment._fields
    assert SlotResult._fields[:EXEC_RESULT_FIELDS] == p.ExecResult._fields


def test_slot_records_cross_the_pipe_as_arrays_of_their_fields():
    t = SlotTask(*task(7), ["abc"], 1000)
    assert SlotTask._make(msgpack.unpackb(msgpack.packb([t]))[0]) == t
    r = SlotResult(7, 1, DONE, b"out", "", 1.0, 2.0, b"", {"hits": 1}, False)
    assert SlotResult._make(msgpack.unpackb(msgpack.packb([r]))[0]) == r


def test_a_slot_answers_a_chunk_with_slot_results_pull_reads():
    """slot.serve in this process, over real pipes: what Pull hands a slot in a Run, and
    what the slot writes back, have the records' shapes."""
    to_slot_r, to_slot_w = os.pipe()
    from_slot_r, from_slot_w = os.pipe()
    pull, _ = make(slots=1)
    pull.mean_s = 0.0001
    pull.on_message(p.Tasks([p.Assignment(1, 1, COMMAND, tasks.encode_command("echo hi"), 0.0, 1, b""),
                             p.Assignment(2, 3, PYTHON, b"not a python body", 0.0, 1, b"")]))
    (run,) = of(pull.turn(), pl.Run)
    pipes.write_frame(to_slot_w, run.tasks)
    os.close(to_slot_w)
    slot.serve(to_slot_r, from_slot_w)
    os.close(from_slot_w)
    frames = []
    while (frame := pipes.read_frame(from_slot_r)) is not None:
        frames.append(frame)
    os.close(to_slot_r)
    os.close(from_slot_r)
    assert {kind for kind, _ in frames} == {pipes.FromSlot.RESULTS}
    frames = [payload for _, payload in frames]
    records = [SlotResult._make(r) for f in frames for r in f]
    assert [(r.tid, r.attempt, r.state, r.cache, r.uploads) for r in records] == [
        (1, 1, DONE, None, False), (2, 3, FAILED, None, False)]
    assert tasks.decode_command_output(records[0].output)[1] == "hi\n"
    for f in frames:
        pull.on_slot_results(0, f)
    assert [(r.tid, r.state) for r in pull.results] == [(1, DONE), (2, FAILED)]
    assert not pull.slots[0].chunk


# ---------------------------------------------------------------- registration and time


def test_registers_at_once_then_backs_off_until_answered():
    pull, clock = make(register=False)
    assert [m.holding for m in sent(pull.turn(), p.Register)] == [[]]
    for wait_s in (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0):
        assert pull.next_register - clock.t == pytest.approx(wait_s)
        clock.t = pull.next_register - 0.01
        assert not sent(pull.turn(), p.Register)
        clock.t = pull.next_register
        assert sent(pull.turn(), p.Register)
    assert pull.flush() == [], "no Report before registration"


def test_registered_joins_refetches_and_asks_for_two_tasks_a_slot():
    pull, _ = make(slots=3, register=False)
    pull.turn()
    pull.on_message(p.Registered("disp-1", 1.0, 10.0, 1 << 20, OUTPUT_LIMIT))
    actions = pull.take_actions()
    assert of(actions, pl.Joined) == [pl.Joined("disp-1")] and of(actions, pl.Refetch)
    assert [r.credit for r in sent(pull.flush(), p.Report)] == [6]
    assert pull.asked == 6
    assert pull.flush() == [], "nothing new: no message"


def test_complaints_come_after_five_seconds_then_every_thirty():
    pull, clock = make(register=False)
    t0 = pull.unregistered_since
    said = []
    for dt in (0.0, 1.0, 4.9, 5.0, 5.1, 20.0, 34.9, 35.0, 36.0, 64.9, 65.0):
        clock.t = t0 + dt
        said += [(dt, c.since_s) for c in of(pull.turn(), pl.Complain)]
    assert said == [(5.0, 5.0), (35.0, 35.0), (65.0, 65.0)]


def test_heartbeat_after_an_interval_of_silence_and_reregistration_after_the_timeout():
    pull, clock = make()
    turn(pull)  # the first Report
    clock.t += 0.5
    assert not sent(turn(pull), p.Heartbeat)
    clock.t += 0.5
    assert sent(turn(pull), p.Heartbeat)
    clock.t += 0.5
    assert not sent(turn(pull), p.Heartbeat), "the heartbeat counted as speaking"
    pull.on_message(p.Tasks([task(1)]))  # heard from the dispatcher
    clock.t += 10.0
    assert not sent(pull.turn(), p.Register)
    clock.t += 0.01
    registers = sent(pull.turn(), p.Register)
    assert not pull.registered and [m.holding for m in registers] == [[(1, 1)]]


def test_idle_timeout_drains_then_says_bye():
    pull, clock = make(idle_timeout_s=5.0)
    pull.on_message(p.Tasks([task(1)]))
    run = of(turn(pull), pl.Run)[0]
    clock.t += 60.0  # busy all this time: no idleness
    pull.on_message(p.Heartbeat())
    turn(pull)
    assert pull.phase is Phase.ACTIVE
    pull.on_slot_results(run.slot, [result(run.tasks[0])])
    turn(pull)  # reports the result; idle from now on
    clock.t += 5.0
    pull.on_message(p.Heartbeat())
    assert not sent(turn(pull), p.Drain)
    clock.t += 0.01
    pull.on_message(p.Heartbeat())
    assert sent(pull.turn(), p.Drain) == [p.Drain([])] and pull.left_idle
    assert sent(pull.turn(), p.Bye) and pull.done


def test_an_allocation_end_drains_a_margin_before_it_busy_or_not():
    """ends_at (a batch job's walltime): at ends_at - margin the queued tasks go back and
    no new one is taken, the running one finishes and is reported, then Bye: the job's end
    kills none of its tasks."""
    clock = Clock(1000.0)
    pull = Pull(1, 1, dataclasses.replace(REGISTER, slots=1), clock=clock, wall=clock,
                ends_at=1100.0, end_margin_s=10.0)
    pull.turn()
    pull.on_message(p.Registered("disp-1", 1.0, 10.0, 256 << 20, OUTPUT_LIMIT))
    pull.take_actions()
    pull.on_message(p.Tasks([task(1), task(2)]))
    run = of(turn(pull), pl.Run)[0]
    clock.t = 1089.9
    pull.on_message(p.Heartbeat())
    assert not sent(turn(pull), p.Drain) and pull.phase is Phase.ACTIVE
    clock.t = 1090.0
    pull.on_message(p.Heartbeat())
    assert sent(pull.turn(), p.Drain) == [p.Drain([(2, 1)])] and pull.phase is Phase.DRAINING
    assert not pull.left_idle
    pull.on_message(p.Tasks([task(3)]))  # sent before the dispatcher heard: handed straight back
    assert sent(pull.turn(), p.Drain) == [p.Drain([(3, 1)])]
    pull.on_slot_results(run.slot, [result(run.tasks[0])])
    actions = turn(pull)
    assert [r.tid for m in sent(actions, p.Report) for r in m.results] == [1]
    assert sent(actions + pull.turn(), p.Bye) and pull.done


@pytest.mark.parametrize("code", [-15, 143])
def test_slots_killed_with_the_whole_job_hand_their_tasks_back(code):
    """scancel or a walltime signals every process of a batch job: the executor is told to
    leave and its slot dies of SIGTERM too; the slot's tasks go back, none fails."""
    pull, _ = make(slots=1)
    pull.on_message(p.Tasks([task(1), task(2), task(3)]))
    run = of(turn(pull), pl.Run)[0]
    pull.request_drain()
    pull.on_slot_died(run.slot, code)
    actions = turn(pull)
    assert sorted(tid for m in sent(actions, p.Drain) for tid, _ in m.returned) == [1, 2, 3]
    assert not [r for m in sent(actions, p.Report) for r in m.results]


def test_commands_killed_with_the_whole_job_go_back_not_failed():
    """scancel signals the commands too: one killed by SIGTERM while the executor is told
    to leave goes back to the dispatcher; one that failed by itself is reported."""
    pull, _ = make(slots=2)
    pull.on_message(p.Tasks([task(1), task(2)]))
    first, second = of(turn(pull), pl.Run)
    pull.request_drain()
    killed = tasks.encode_command_output(-15, b"", b"", False)
    failed = tasks.encode_command_output(2, b"", b"oops", False)
    pull.on_slot_results(first.slot, [result(first.tasks[0], state=FAILED, output=killed)])
    pull.on_slot_results(second.slot, [result(second.tasks[0], state=FAILED, output=failed)])
    actions = turn(pull)
    back = [tid for m in sent(actions, p.Drain) for tid, _ in m.returned]
    reported = [r.tid for m in sent(actions, p.Report) for r in m.results]
    assert back == [tids(first)[0]] and reported == [tids(second)[0]]


def test_a_command_killed_by_sigterm_while_the_executor_stays_fails():
    pull, _ = make(slots=1)
    pull.on_message(p.Tasks([task(1)]))
    run = of(turn(pull), pl.Run)[0]
    killed = tasks.encode_command_output(-15, b"", b"", False)
    pull.on_slot_results(run.slot, [result(run.tasks[0], state=FAILED, output=killed)])
    assert [(r.tid, r.state) for m in sent(turn(pull), p.Report) for r in m.results] == [(1, FAILED)]


def test_a_slot_that_dies_of_sigterm_while_the_executor_stays_fails_its_task():
    pull, _ = make(slots=1)
    pull.on_message(p.Tasks([task(1)]))
    run = of(turn(pull), pl.Run)[0]
    pull.on_slot_died(run.slot, 143)  # not the executor's leaving: the task's own doing
    results = [r for m in sent(turn(pull), p.Report) for r in m.results]
    assert [(r.tid, r.state) for r in results] == [(1, FAILED)] and "exit status 143" in results[0].reason


def test_no_allocation_end_never_drains():
    pull, clock = make()  # ends_at 0: no end
    clock.t += 10 ** 9
    pull.on_message(p.Heartbeat())
    turn(pull)
    assert pull.phase is Phase.ACTIVE


def test_idle_timeout_zero_never_leaves():
    pull, clock = make()
    for _ in range(5):
        clock.t += 1_000.0
        pull.on_message(p.Heartbeat())
        turn(pull)
    assert pull.phase is Phase.ACTIVE


# ---------------------------------------------------------------- feeding slots


def test_first_tasks_go_one_per_slot_and_are_reported_started():
    pull, _ = make(slots=2)
    pull.on_message(p.Tasks([task(1), task(2), task(3)]))
    actions = turn(pull)
    runs = of(actions, pl.Run)
    assert [(r.slot, tids(r)) for r in runs] == [(0, [1]), (1, [2])]
    assert runs[0].tasks[0] == SlotTask(*task(1), [], OUTPUT_LIMIT)
    assert sent(actions, p.Report)[0].started == [(1, 1), (2, 1)]
    assert [a.tid for a in pull.queue] == [3]


def test_a_short_tasks_result_carries_its_start_in_one_report():
    pull, clock = make(slots=1, prefetch=0)
    pull.flush()
    pull.on_message(p.Tasks([task(1)]))
    run = of(pull.turn(), pl.Run)[0]
    assert pull.flush() == [] and pull.report_due_in() == pytest.approx(pl.START_HOLD_S)
    clock.t += pl.START_HOLD_S / 2
    assert pull.report_due_in() == pytest.approx(pl.START_HOLD_S / 2)
    pull.on_slot_results(run.slot, [result(run.tasks[0])])
    (report,) = sent(pull.flush(), p.Report)
    assert report.started == [(1, 1)] and [r.tid for r in report.results] == [1]
    assert pull.report_due_in() is None, "nothing held once it went"


def test_short_tasks_come_in_chunks_of_about_twenty_milliseconds_and_are_pipelined():
    pull, _ = make(slots=2)
    pull.on_message(p.Tasks([task(1), task(2)]))
    runs = of(turn(pull), pl.Run)
    pull.on_slot_results(0, [result(runs[0].tasks[0], took=2**-10)])  # mean about 1 ms: 20 per chunk
    pull.on_message(p.Tasks([task(t) for t in range(10, 110)]))
    runs = of(pull.turn(), pl.Run)
    assert [(r.slot, len(r.tasks)) for r in runs] == [(0, 20), (1, 20)], "slot 1 runs one task: it gets more"
    assert pull.chunk_size() == 20
    pull.on_message(p.Tasks([]))
    assert not of(pull.turn(), pl.Run), "a slot with two chunks' worth waits"


def test_a_free_slot_is_fed_before_work_is_pipelined_behind_a_running_task():
    pull, _ = make(slots=2)
    pull.on_message(p.Tasks([task(1), task(2)]))
    runs = of(turn(pull), pl.Run)
    pull.on_slot_results(1, [result(runs[1].tasks[0], took=0.0001)])  # slot 0 still runs task 1
    pull.on_message(p.Tasks([task(3)]))
    assert [(r.slot, tids(r)) for r in of(pull.turn(), pl.Run)] == [(1, [3])]


def test_wall_time_tasks_are_not_pipelined_behind_a_running_task():
    pull, _ = make(slots=1)
    pull.mean_s = 0.0001
    pull.on_message(p.Tasks([task(1), task(2, walltime_s=5.0)]))
    assert [tids(r) for r in of(pull.turn(), pl.Run)] == [[1]]
    assert not of(pull.turn(), pl.Run), "task 2 waits for the slot to be free"


def pipelined() -> tuple[Pull, Clock, list]:
    """Slot 0 runs task 1 with chunk [2, 3] sent ahead; slot 1 runs task 4 with [5] ahead."""
    pull, clock = make(slots=2)
    pull.mean_s = 0.001  # 2 tasks per chunk, pipelined
    pull.on_message(p.Tasks([task(1), task(4)]))
    runs = of(pull.turn(), pl.Run)
    pull.on_message(p.Tasks([task(2), task(3), task(5)]))
    runs += of(pull.turn(), pl.Run)
    assert [(r.slot, tids(r)) for r in runs] == [(0, [1]), (1, [4]), (0, [2, 3]), (1, [5])]
    return pull, clock, runs


def test_a_slot_whose_task_runs_past_the_overdue_time_is_asked_for_what_waits_behind_it():
    pull, clock, runs = pipelined()
    assert pull.overdue_s() == pl.OVERDUE_MIN_S
    clock.t += pl.OVERDUE_MIN_S * 0.9
    pull.on_slot_results(1, [result(runs[1].tasks[0])])  # slot 1 now runs task 5, nothing behind
    clock.t += pl.OVERDUE_MIN_S * 0.2
    assert of(pull.turn(), pl.Reclaim) == [pl.Reclaim(0)]
    assert not of(pull.turn(), pl.Reclaim), "one Reclaim until it is answered"
    clock.t += pl.OVERDUE_MIN_S
    assert not of(pull.turn(), pl.Reclaim), "slot 1's overdue task has nothing behind it"


def test_tasks_handed_back_go_to_a_slot_not_overdue_nor_owing_an_answer():
    pull, clock, runs = pipelined()
    clock.t += pl.OVERDUE_MIN_S * 1.1
    assert of(pull.turn(), pl.Reclaim) == [pl.Reclaim(0), pl.Reclaim(1)]
    pull.on_slot_results(0, [])  # results sent with the answer: of tasks before the overdue one
    pull.on_handed_back(0, [2, 3], 1.0)
    assert [a.tid for a in pull.queue] == [2, 3] and list(pull.slots[0].chunk) == [1]
    pull.on_slot_results(1, [result(runs[1].tasks[0])])  # slot 1 ran task 4, runs 5: it owes an answer
    assert not of(pull.turn(), pl.Run), "slot 0 is overdue, slot 1 owes an answer"
    pull.on_handed_back(1, [], 0.01)  # too late: it had started task 5
    runs = of(pull.turn(), pl.Run)
    assert runs and all(r.slot == 1 for r in runs) and tids(runs[0])[0] == 2


def test_an_answer_handing_back_nothing_or_unknown_tasks_changes_nothing_but_the_wait():
    pull, clock, _ = pipelined()
    clock.t += pl.OVERDUE_MIN_S * 1.1
    pull.turn()
    pull.on_handed_back(0, [99], 1.0)  # it had started them all (99 is not its)
    assert not pull.queue and list(pull.slots[0].chunk) == [1, 2, 3] and not pull.slots[0].reclaiming
    assert of(pull.turn(), pl.Reclaim) == [pl.Reclaim(0)], "still overdue with tasks behind: asked again"


def test_a_slot_that_dies_owes_no_answer():
    pull, clock, _ = pipelined()
    clock.t += pl.OVERDUE_MIN_S * 1.1
    pull.turn()
    pull.on_slot_died(0, -9)
    assert not pull.slots[0].reclaiming and [a.tid for a in pull.queue] == [2, 3]


def test_a_slot_answers_a_reclaim_with_what_it_has_not_started_and_its_unread_chunks():
    """slot.Work over real pipes, as the signal handler runs it during a task."""
    to_slot_r, to_slot_w = os.pipe()
    from_slot_r, from_slot_w = os.pipe()
    work = slot.Work(to_slot_r, from_slot_w)
    work.pending.extend([list(task(2)) + [[], 100], list(task(3)) + [[], 100]])
    work.unsent = [(1, 1, DONE, b"", "", 1.0, 2.0, b"", None, False)]
    pipes.write_frame(to_slot_w, [list(task(7)) + [[], 100]])  # a chunk sent ahead
    work.phase, work.started = slot.Phase.RUNNING, time.time() - 5
    work.on_reclaim(pipes.RECLAIM_SIGNAL, None)
    first, second = pipes.read_frame(from_slot_r), pipes.read_frame(from_slot_r)
    assert first[0] == pipes.FromSlot.RESULTS and [r[0] for r in first[1]] == [1]
    assert second[0] == pipes.FromSlot.HANDED_BACK and second[1][0] == [2, 3, 7] and 5 <= second[1][1] < 60
    assert not work.pending and not work.unsent
    work.phase = slot.Phase.BETWEEN  # writing results, maybe: only noted
    work.on_reclaim(pipes.RECLAIM_SIGNAL, None)
    assert work.reclaim
    for fd in (to_slot_r, to_slot_w, from_slot_r, from_slot_w):
        os.close(fd)


def test_long_tasks_wait_for_a_free_slot():
    pull, _ = make(slots=1)
    pull.on_message(p.Tasks([task(1), task(2), task(3)]))
    run = of(turn(pull), pl.Run)[0]
    pull.on_slot_results(0, [result(run.tasks[0], took=0.5)])
    run = of(pull.turn(), pl.Run)[0]
    assert tids(run) == [2], "one at a time"
    assert not of(pull.turn(), pl.Run), "no pipelining for long tasks"


def test_wall_time_and_multi_cpu_and_staged_tasks_go_alone():
    pull, _ = make(slots=4, cpus=4)
    pull.mean_s = 0.0001
    pull.on_message(p.Tasks([task(1, walltime_s=5.0), task(2), task(3), task(4, cpus=2), task(5), task(6)]))
    runs = of(pull.turn(), pl.Run)
    assert [tids(r) for r in runs] == [[1], [2, 3], [4]]
    assert [a.tid for a in pull.queue] == [5, 6], "task 5 waits: the 2-cpu task and the two others hold 4 cpus"


def test_a_large_task_waits_for_its_cpus_and_nothing_overtakes_it():
    pull, _ = make(slots=4, cpus=4)
    pull.on_message(p.Tasks([task(1), task(2, cpus=4), task(3)]))
    runs = of(pull.turn(), pl.Run)
    assert [tids(r) for r in runs] == [[1]]
    pull.on_slot_results(0, [result(runs[0].tasks[0], took=1.0)])
    runs = of(pull.turn(), pl.Run)
    assert [tids(r) for r in runs] == [[2]]


def test_credit_tops_up_to_slots_plus_a_prefetch_of_fifty_milliseconds():
    pull, _ = make(slots=2)
    pull.on_message(p.Tasks([task(1), task(2), task(3), task(4)]))
    runs = of(turn(pull), pl.Run)
    for r in runs:
        pull.on_slot_results(r.slot, [result(r.tasks[0], took=2**-10)])  # about 1 ms: 103 more cover 50 ms
    report = sent(turn(pull), p.Report)[0]
    assert pull.target() == 2 + 103
    assert report.credit == 105 - 2  # the two still queued count
    assert pull.asked == 103


def test_fixed_prefetch_and_small_top_ups_wait_for_a_results_report():
    pull, clock = make(slots=8, prefetch=0)
    pull.flush()
    assert pull.target() == 8 and pull.asked == 8
    pull.on_message(p.Tasks([task(1)]))
    run = of(pull.turn(), pl.Run)[0]
    assert pull.flush() == [], "starts alone wait a moment for a result"
    clock.t += pl.START_HOLD_S
    assert [(r.credit, r.started) for r in sent(pull.flush(), p.Report)] == [(0, [(1, 1)])]
    pull.on_slot_results(run.slot, [result(run.tasks[0])])
    assert [r.credit for r in sent(pull.flush(), p.Report)] == [1], "one more rides with the result"
    pull.asked = 7  # a deficit of 1 in 8: not worth a message of its own
    assert pull.flush() == []
    pull.asked = 6  # 2 in 8 is
    assert [r.credit for r in sent(pull.flush(), p.Report)] == [2]


# ---------------------------------------------------------------- failures and cancels


def test_wall_time_kills_the_slot_after_the_limit_plus_grace_for_commands():
    pull, clock = make(slots=2)
    pull.on_message(p.Tasks([task(1, walltime_s=1.0), task(2, kind=PYTHON, walltime_s=1.0)]))
    turn(pull)
    clock.t += 1.01
    actions = pull.turn()
    assert of(actions, pl.Kill) == [pl.Kill(1, "a task ran past its wall time")]
    clock.t += 5.0
    actions = pull.turn() + pull.flush()
    assert [k.slot for k in of(actions, pl.Kill)] == [0]
    failed = sent(actions, p.Report)[0].results
    assert sorted(r.tid for r in failed) == [1, 2] and all(r.state == FAILED for r in failed)
    assert "wall time of 1s exceeded" in failed[0].reason


def test_a_dead_slot_fails_its_task_and_requeues_the_rest_of_its_chunk():
    pull, _ = make(slots=1)
    pull.mean_s = 0.0001
    pull.on_message(p.Tasks([task(1), task(2), task(3)]))
    run = of(pull.turn(), pl.Run)[0]
    assert tids(run) == [1, 2, 3]
    pull.on_slot_died(0, -9)
    assert [a.tid for a in pull.queue] == [2, 3]
    r = pull.results[0]
    assert (r.tid, r.state, r.reason) == (1, FAILED, "the slot process running this task died (signal 9)")


def test_a_chunk_that_could_not_be_written_goes_back_unstarted():
    pull, _ = make(slots=1)
    pull.on_message(p.Tasks([task(1)]))
    run = of(pull.turn(), pl.Run)[0]
    pull.on_run_failed(run, -9)
    assert [a.tid for a in pull.queue] == [1] and not pull.started and not pull.results
    assert not pull.slots[0].chunk


def test_cancel_drops_queued_and_staged_tasks_not_running_ones():
    pull, _ = make(slots=1)
    pull.on_message(p.Tasks([task(1), task(2), task(3), task(4, files=b"spec")]),
                    {4: pl.Inputs(frozenset({"d1"}), ["d1"])})
    pull.turn()
    pull.on_message(p.CancelTasks([1, 2, 4]))
    assert [(r.tid, r.state) for r in pull.results] == [(2, CANCELLED), (4, CANCELLED)]
    assert [a.tid for a in pull.queue] == [3] and not pull.staged and not pull.prefetched


# ---------------------------------------------------------------- leaving and abandoning


def test_drain_hands_back_the_queue_finishes_running_tasks_then_says_bye():
    pull, _ = make(slots=1)
    pull.on_message(p.Tasks([task(1), task(2), task(3)]))
    run = of(turn(pull), pl.Run)[0]
    pull.request_drain()
    assert sent(pull.turn(), p.Drain) == [p.Drain([(2, 1), (3, 1)])]
    pull.on_message(p.Tasks([task(4)]))
    assert sent(pull.take_actions(), p.Drain) == [p.Drain([(4, 1)])], "late tasks go straight back"
    assert all(r.credit == 0 for r in sent(pull.flush(), p.Report))
    assert not sent(pull.turn(), p.Bye), "task 1 still runs"
    pull.on_slot_results(0, [result(run.tasks[0])])
    assert not sent(pull.turn(), p.Bye), "its result is not reported yet"
    assert [r.tid for r in sent(pull.flush(), p.Report)[0].results] == [1]
    assert sent(pull.turn(), p.Bye) and pull.done and not pull.stop_requested


def test_a_second_drain_request_stops_at_once():
    pull, _ = make()
    pull.request_drain()
    assert not pull.done
    pull.request_drain()
    assert pull.done and pull.stop_requested


def test_leave_from_the_dispatcher_drains():
    pull, _ = make()
    pull.on_message(p.Leave("released"))
    assert pull.phase is Phase.DRAINING and sent(pull.take_actions(), p.Drain)


def test_refused_ends_with_status_one():
    pull, _ = make(register=False)
    pull.on_message(p.Refused("protocol version 3 is not 4"))
    assert pull.done and pull.exit_code == 1


@pytest.mark.parametrize("event", ["reregister", "new dispatcher"])
def test_lost_registration_abandons_all_work(event):
    pull, _ = make(slots=2)
    pull.mean_s = 0.1
    pull.on_message(p.Tasks([task(1), task(2), task(3), task(4, files=b"spec")]),
                    {4: pl.Inputs(frozenset({"d1"}), ["d1"])})
    runs = of(turn(pull), pl.Run)
    pull.on_slot_results(0, [result(runs[0].tasks[0], files=b"out", uploads=True)])
    if event == "reregister":
        pull.on_message(p.Reregister("who are you?"))
    else:
        pull.on_message(p.Registered("disp-2", 1.0, 10.0, 1 << 20, OUTPUT_LIMIT))
    actions = pull.turn()
    assert of(actions, pl.AbortFetches) and of(actions, pl.ClearOutbox) == [pl.ClearOutbox(b"out")]
    assert [k.slot for k in of(actions, pl.Kill)] == [1]
    assert not (pull.queue or pull.staged or pull.results or pull.started or pull.to_upload)
    assert not pull.holding()
    if event == "reregister":
        assert [m.holding for m in sent(actions, p.Register)] == [[]]


# ---------------------------------------------------------------- staging and reports


def test_tasks_with_files_wait_for_their_inputs():
    pull, _ = make(slots=2)
    pull.on_message(p.Tasks([task(1, files=b"a"), task(2, files=b"b"), task(3, files=b"c"), task(4, files=b"d")]),
                    {1: pl.Inputs(frozenset({"d1", "d2"}), ["d1", "d2"]), 2: pl.Inputs(frozenset({"d2"}), []),
                     3: "the task's files could not be read: no", 4: pl.Inputs(frozenset(), [])})
    assert [a.tid for a in pull.queue] == [4] and set(pull.staged) == {1, 2}
    assert [(r.tid, r.state) for r in pull.results] == [(3, FAILED)]
    pull.on_inputs("d2", "")
    assert [a.tid for a in pull.queue] == [4, 2]
    pull.on_inputs("d1", "")
    runs = of(pull.turn(), pl.Run)
    assert [(t.tid, t.prefetched) for t in (SlotTask._make(r.tasks[0]) for r in runs)] == [(4, []), (2, [])]
    assert [a.tid for a in pull.queue] == [1]


def test_a_failed_download_fails_the_tasks_waiting_for_it():
    pull, _ = make()
    pull.on_message(p.Tasks([task(1, files=b"a")]), {1: pl.Inputs(frozenset({"d1"}), ["d1"])})
    pull.on_inputs("d1", "input d1... could not be fetched")
    assert not pull.staged and not pull.prefetched
    assert [(r.tid, r.state, r.reason) for r in pull.results] == [(1, FAILED, "input d1... could not be fetched")]


def test_outputs_are_uploaded_before_the_report_that_carries_their_result():
    pull, _ = make(slots=1)
    pull.on_message(p.Tasks([task(1, files=b"spec"), task(2, files=b"spec")]))
    run = of(turn(pull), pl.Run)[0]
    pull.on_slot_results(0, [result(run.tasks[0], files=b"paths", uploads=True, cache={"hits": 1})])
    run = of(pull.turn(), pl.Run)[0]
    assert pull.flush() == [pl.Upload(1, b"paths")], "no Report while an upload waits"
    assert pull.flush() == [pl.Upload(1, b"paths")], "asked again until it is done"
    pull.uploaded(1, b"blobs")
    report = sent(pull.flush(), p.Report)[0]
    assert [(r.tid, r.files) for r in report.results] == [(1, b"blobs")]
    assert report.stats == {"cache": {"hits": 1, "misses": 0, "bytes_fetched": 0}}
    pull.on_slot_results(0, [result(run.tasks[0], files=b"paths", uploads=True)])
    assert pull.flush() == [pl.Upload(2, b"paths")]
    pull.upload_failed(2, "an output could not be read back")
    report = sent(pull.flush(), p.Report)[0]
    assert [(r.tid, r.state, r.files) for r in report.results] == [(2, FAILED, b"")]
    assert report.stats == {}, "the cache counts did not change"


def test_results_are_split_under_the_message_budget_and_an_oversized_one_fails():
    pull, _ = make(slots=1, max_message_bytes=2_000)  # a budget of 1,000 bytes a Report
    pull.on_message(p.Tasks([task(t) for t in range(1, 5)]))
    pull.mean_s = 0.0001
    run = of(pull.turn(), pl.Run)[0]
    outputs = [b"x" * 400, b"y" * 400, b"z" * 5_000, b"w" * 10]
    pull.on_slot_results(0, [result(t, output=o) for t, o in zip(run.tasks, outputs)])
    reports = sent(pull.flush(), p.Report)
    assert [[r.tid for r in rep.results] for rep in reports] == [[1, 2], [3, 4]]
    big = reports[1].results[0]
    assert big.state == FAILED and big.output == b"" and "larger than the dispatcher accepts" in big.reason


def test_a_report_that_could_not_be_sent_is_kept_in_order():
    pull, _ = make(slots=1)
    pull.on_message(p.Tasks([task(1), task(2)]))
    pull.mean_s = 0.0001
    run = of(pull.turn(), pl.Run)[0]
    pull.on_slot_results(0, [result(t) for t in run.tasks])
    asked = pull.asked
    (report,) = sent(pull.flush(), p.Report)
    pull.unsent(report)
    assert pull.asked == asked
    (again,) = sent(pull.flush(), p.Report)
    assert again == report


# ---------------------------------------------------------------- properties


class Model:
    """A dispatcher that honours credit and slots that run their chunks in order."""

    def __init__(self, pull: Pull, prefetch: int):
        self.pull, self.prefetch = pull, prefetch
        self.credit = 0  # granted and not used
        self.next_tid = 1
        self.given: list[int] = []  # every tid sent to the executor
        self.reported: list[int] = []  # every tid in a Report's results or a Drain's returned
        self.started: list[int] = []
        self.running: list[list[SlotTask]] = [[] for _ in pull.slots]
        self.reclaims: set[int] = set()  # slots asked for their queued tasks, not yet answered

    def apply(self, actions: list) -> None:
        for a in actions:
            if type(a) is pl.Run:
                assert 1 <= len(a.tasks) <= pl.MAX_CHUNK
                self.running[a.slot] += [SlotTask._make(t) for t in a.tasks]
            elif type(a) is pl.Reclaim:
                assert a.slot not in self.reclaims, "one Reclaim per answer"
                self.reclaims.add(a.slot)
            elif type(a) is pl.Send:
                self.receive(a.msg)

    def receive(self, msg) -> None:
        if type(msg) is p.Report:
            assert msg.credit >= 0
            assert len(msg.results) <= pl.MAX_REPORT
            size = sum(len(r.output) + len(r.reason) + p.RECORD_OVERHEAD for r in msg.results)
            assert len(msg.results) <= 1 or size <= p.record_budget(self.pull.max_message_bytes)
            self.credit += msg.credit
            assert not set(self.reported) & {tid for tid, _ in msg.started}, "a start after its result"
            self.started += [tid for tid, _ in msg.started]
            self.reported += [r.tid for r in msg.results]
        elif type(msg) is p.Drain:
            self.credit = 0
            self.reported += [tid for tid, _ in msg.returned]

    def send_tasks(self, n: int, big: bool) -> None:
        n = min(n, self.credit)
        tasks = [task(self.next_tid + i, cpus=2 if big and i == 0 else 1) for i in range(n)]
        self.next_tid += n
        self.credit -= n
        self.given += [t.tid for t in tasks]
        self.pull.on_message(p.Tasks(tasks))

    def finish(self, slot: int, n: int, took: float) -> None:
        done, self.running[slot] = self.running[slot][:n], self.running[slot][n:]
        if done:
            self.pull.on_slot_results(slot, [result(t, took=took, output=b"o" * 300) for t in done])

    def die(self, slot: int) -> None:
        self.running[slot] = []
        self.reclaims.discard(slot)
        self.pull.on_slot_died(slot, -9)

    def hand_back(self, slot: int) -> None:
        """The slot answers a Reclaim: all but the task it runs go back."""
        if slot in self.reclaims:
            self.reclaims.discard(slot)
            back, self.running[slot] = self.running[slot][1:], self.running[slot][:1]
            self.pull.on_handed_back(slot, [t.tid for t in back], 0.0)

    def check(self) -> None:
        pull = self.pull
        in_hand = len(pull.queue) + len(pull.staged) + sum(len(s.chunk) for s in pull.slots)
        assert in_hand <= len(pull.slots) + self.prefetch
        assert pull.asked >= 0 and self.credit >= 0
        assert pull.asked == self.credit or pull.phase is not Phase.ACTIVE
        for s, running in zip(pull.slots, self.running):
            assert list(s.chunk) == [t.tid for t in running], "Pull and the slot agree on what it runs"
        held = [tid for tid, _ in pull.holding()]
        assert sorted(held) == sorted(set(self.given) - set(self.reported)), "it holds what it has not reported"


events = st.one_of(
    st.tuples(st.just("tasks"), st.integers(0, 40), st.booleans()),
    st.tuples(st.just("finish"), st.integers(0, 3), st.integers(1, 70), st.sampled_from([1e-5, 1e-3, 0.1])),
    st.tuples(st.just("die"), st.integers(0, 3)),
    st.tuples(st.just("hand_back"), st.integers(0, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 60), st.integers(0, 60)),
    st.tuples(st.just("tick"), st.floats(0, 3)),
    st.tuples(st.just("lost")),  # the dispatcher went quiet for longer than the timeout, then answered
    st.tuples(st.just("drain")),
)


@settings(max_examples=150, deadline=None)
@given(slots=st.integers(1, 4), prefetch=st.integers(0, 30), script=st.lists(events, max_size=60))
def test_random_runs_keep_the_pull_invariants(slots, prefetch, script):
    pull, clock = make(slots=slots, cpus=max(slots, 2), prefetch=prefetch, max_message_bytes=4_000)
    model = Model(pull, prefetch)
    model.apply(pull.flush())
    for event in script:
        if pull.done:  # the agent's loop has ended
            break
        kind = event[0]
        if kind == "tasks":
            model.send_tasks(event[1], event[2])
        elif kind == "finish":
            model.finish(event[1] % slots, event[2], event[3])
        elif kind == "die":
            model.die(event[1] % slots)
        elif kind == "hand_back":
            model.hand_back(event[1] % slots)
        elif kind == "cancel":
            pull.on_message(p.CancelTasks(list(range(event[1], event[1] + event[2]))))
        elif kind == "tick":
            clock.t += event[1]
            pull.on_message(p.Heartbeat())
        elif kind == "lost":
            clock.t += 10.5
            actions = pull.turn()
            model.apply(actions)
            assert not pull.registered and sent(actions, p.Register)
            pull.on_message(p.Registered("disp-1", 1.0, 10.0, 4_000, OUTPUT_LIMIT))
            model.credit = 0  # the dispatcher starts its credit again at 0
        elif not pull.drain_requested:  # a second request would stop at once, dropping work
            pull.request_drain()
        model.apply(pull.turn())
        model.apply(pull.flush())
        model.check()
    # Wind down: drain, let every slot finish, until the executor says Bye.
    if not pull.drain_requested:
        pull.request_drain()
    for _ in range(200):
        if pull.done:
            break
        for i in range(slots):
            model.hand_back(i)
            model.finish(i, pl.MAX_CHUNK, 1e-3)
        model.apply(pull.turn())
        model.apply(pull.flush())
        model.check()
    assert pull.done
    assert sorted(model.reported) == sorted(model.given), "every task received is reported exactly once"
    assert set(model.started) <= set(model.given)


@settings(max_examples=100, deadline=None)
@given(idle_s=st.floats(0.5, 100), steps=st.lists(st.floats(0, 20), max_size=20))
def test_idle_timeout_leaves_exactly_when_idle_longer_than_the_timeout(idle_s, steps):
    pull, clock = make(idle_timeout_s=idle_s)
    start = clock.t
    for dt in steps:
        clock.t += dt
        pull.on_message(p.Heartbeat())
        pull.turn()
        assert pull.left_idle == (clock.t - start > idle_s)
        if pull.left_idle:
            break


@settings(max_examples=100, deadline=None)
@given(mean_s=st.floats(1e-7, 10), queued=st.integers(1, 5000), slots=st.integers(1, 64))
def test_chunks_are_between_one_and_max_chunk_and_share_the_queue(mean_s, queued, slots):
    pull, _ = make(slots=slots)
    pull.mean_s = mean_s
    pull.queue.extend(task(t) for t in range(queued))
    n = pull.chunk_size()
    assert 1 <= n <= pl.MAX_CHUNK
    assert n <= -(-queued // slots)
    assert pull.target() <= slots + pl.MAX_BACKLOG
