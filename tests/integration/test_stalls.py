"""A dispatcher whose own loop stalls (SIGSTOP, swapped out, a starved VM) must not judge
healthy executors lost for the silence it caused, nor spend a task's retries on it."""

from __future__ import annotations

import signal
import time

from cluster_helpers import HEARTBEAT_TIMEOUT_S, wait_until


def test_a_paused_dispatcher_loses_no_executor_and_spends_no_retry(cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    cluster.start_dispatcher()
    cluster.start_executor("e1", 2, "--prefetch", "0")  # no task held beyond the slots: all four run at once
    cluster.start_executor("e2", 2, "--prefetch", "0")
    with cluster.client() as client:
        wait_until(lambda: client.status()["slots"] == 4, what="both executors registered")
        futures = [client.submit_command(f"echo run >> {marks}/{i}; sleep 3", retries=0) for i in range(4)]
        wait_until(lambda: client.status()["tasks"]["running"] == 4, what="all four tasks running")
        cluster.kill("dispatcher", signal.SIGSTOP)
        time.sleep(HEARTBEAT_TIMEOUT_S * 2.5)  # the fault itself: a pause longer than the timeout
        cluster.kill("dispatcher", signal.SIGCONT)
        results = [f.result(timeout=60) for f in futures]
        status = client.status()
    assert all(r.ok for r in results), [r.reason for r in results]
    assert status["lost_executors"] == 0
    assert {p.name: p.read_text() for p in marks.iterdir()} == {str(i): "run\n" for i in range(4)}  # ran once each
    assert "stalled for" in cluster.log("dispatcher")
