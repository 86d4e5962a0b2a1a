"""The Python API as a workflow engine uses it, on an embedded local cluster."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest

import falconet
from falconet.errors import RemoteTraceback


class Boom(Exception):
    pass


def explode(message):
    raise Boom(message)


def test_the_quick_start_example():
    with falconet.local(slots=2) as client:
        fut = client.submit(pow, 2, 10)
        cmd = client.submit_command("echo hi", retries=2)
        offset = 5
        squares = list(client.map(lambda x: x * x + offset, range(10_000)))
        assert isinstance(fut, cf.Future)
        assert fut.result(timeout=60) == 1024
        res = cmd.result(timeout=60)
        assert (res.exit_code, res.stdout, res.stderr, res.ok) == (0, "hi\n", "", True)
        assert squares == [x * x + 5 for x in range(10_000)]


def test_exceptions_carry_the_remote_traceback_and_executor_pool_works():
    with falconet.local(slots=2) as client:
        with pytest.raises(Boom, match="from afar") as info:
            client.submit(explode, "from afar").result(timeout=60)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "explode" in str(info.value.__cause__)

        with client.executor() as pool:
            assert isinstance(pool, cf.Executor)
            futures = [pool.submit(divmod, i, 7) for i in range(100)]
            done, _ = cf.wait(futures, timeout=60)
            assert len(done) == 100
            assert [f.result() for f in futures] == [divmod(i, 7) for i in range(100)]
            assert list(pool.map(str, range(5))) == ["0", "1", "2", "3", "4"]


def test_submit_from_many_threads_and_cancel():
    with falconet.local(slots=1) as client:
        gate = client.submit_command("sleep 0.5")  # holds the only slot
        results: list[cf.Future] = []
        lock = threading.Lock()

        def worker(base):
            for i in range(200):
                fut = client.submit(int.__add__, base, i)
                with lock:
                    results.append((base + i, fut))

        threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        late = client.submit_command("echo never")
        assert late.cancel()
        assert gate.result(timeout=60).ok
        assert all(fut.result(timeout=60) == want for want, fut in results)
        assert late.cancelled()
        assert client.status()["tasks"]["cancelled"] == 1  # the dispatcher dropped it too
        with pytest.raises(cf.CancelledError):
            late.result()


def test_unknown_task_kind_fails_with_a_clear_reason():
    with falconet.local(slots=1) as client:
        [fut] = client._enqueue([(99, b"whatever", "odd")], None, None)
        with pytest.raises(falconet.TaskError, match="unknown task kind 99"):
            fut.result(timeout=60)
        assert client.submit(abs, -3).result(timeout=60) == 3
