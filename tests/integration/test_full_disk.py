"""A full disk under --state-dir, for real: a small tmpfs (needs root to mount; CI runs as
root).  The dispatcher keeps serving, refuses new tasks with the reason, loses nothing, and
takes new work again once there is room; a restart on the still-full disk does not crash."""

from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest
from cluster_helpers import wait_until

from falconet.errors import TaskError


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a 4 MB tmpfs (CI runs as root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk) -> None:
    """Write a filler file until the disk is full."""
    with open(disk / "filler", "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(disk / "filler2", "ab", buffering=0) as f:  # the last few bytes too
        try:
            while True:
                f.write(b"\0" * 512)
                f.flush()
        except OSError:
            pass


def journal(client) -> dict:
    return client.status()["journal"]


def test_a_full_journal_disk_refuses_new_tasks_loses_nothing_and_recovers(cluster, small_disk):
    state = small_disk / "state"
    cluster.start_dispatcher(extra=("--state-dir", str(state)))
    cluster.start_executor("e1", 2)
    with cluster.client(name="disk") as client:
        assert all(f.result(timeout=60).ok for f in client.submit_commands(["true"] * 100))
        fill(small_disk)
        held = client.submit_commands(["true"] * 100)  # accepted by the core; its journal write fails
        wait_until(lambda: journal(client)["writable"] is False, what="the journal to be found full")
        info = journal(client)
        assert str(state / "journal") in info["error"] and "No space left on device" in info["error"]
        refused = client.submit_commands(["true"] * 10)
        for f in refused:
            with pytest.raises(TaskError, match="refuses new tasks.*No space left on device"):
                f.result(timeout=60)
        shown = subprocess.run([*cluster_falconet(), "status", "--dispatcher", cluster.client_address],
                               capture_output=True, text=True, timeout=60)
        assert "NOT WRITABLE" in shown.stdout and "new tasks are refused" in shown.stdout, shown.stdout
        # The dispatcher dies on the full disk (SIGKILL) and starts again on it: no crash loop.
        cluster.kill("dispatcher", signal.SIGKILL)
        cluster.dispatcher.wait(30)
        cluster.start_dispatcher(client_port=int(cluster.client_address.rsplit(":", 1)[1]),
                                 executor_port=int(cluster.executor_address.rsplit(":", 1)[1]),
                                 extra=("--state-dir", str(state)))
        wait_until(lambda: journal(client)["writable"] is False, timeout_s=60,
                   what="the restarted dispatcher to find the disk full")
        assert cluster.dispatcher.poll() is None
        (small_disk / "filler").unlink()
        (small_disk / "filler2").unlink()
        assert all(f.result(timeout=120).ok for f in held)  # nothing accepted was lost
        wait_until(lambda: journal(client)["writable"], what="the journal to be written again")
        assert all(f.result(timeout=60).ok for f in client.submit_commands(["true"] * 20))
    assert "journal.new" not in os.listdir(state)


def cluster_falconet() -> list[str]:
    from falconet import spawn

    return spawn.falconet()


def test_compaction_checks_for_room_and_cleans_up_after_itself(small_disk):
    from falconet.dispatcher.journal import Journal, Kind
    from falconet.errors import JournalWriteError

    j = Journal(small_disk / "state")
    list(j.replay())
    for i in range(200):
        j.append(Kind.ACK, b"client", list(range(i, i + 300)))
    j.commit()
    size = j.size
    fill(small_disk)
    assert not j.room_to_compact()
    with pytest.raises(JournalWriteError, match="cannot compact the journal into .*journal.new"):
        j.rewrite([(Kind.ACK, (b"client", list(range(100_000))))])  # more than the room left
    assert not (small_disk / "state" / "journal.new").exists() and j.size == size
    fill(small_disk)  # again: removing the partial copy gave its room back
    j.append(Kind.ACK, b"client", [1] * 20_000)
    with pytest.raises(JournalWriteError, match=r"cannot write the journal .*state/journal: No space left"):
        j.commit()
    assert os.path.getsize(small_disk / "state" / "journal") == size  # cut back to its last whole record
    for name in ("filler", "filler2"):
        (small_disk / name).unlink()
    assert j.commit() > 0  # the record kept is written once there is room
    j.close()
    again = Journal(small_disk / "state")
    assert [fields for _, fields in again.replay()][-1] == [b"client", [1] * 20_000]
    again.close()
