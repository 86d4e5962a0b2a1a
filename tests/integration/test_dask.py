"""Dask on falconet: ``dask.compute(..., scheduler=client.executor())`` on a real local
cluster, for delayed, bag and array, compared with Dask's own threaded scheduler."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

dask = pytest.importorskip("dask", reason="dask is not installed (pip install 'falconet[dask]')")
np = pytest.importorskip("numpy", reason="dask.array needs numpy (pip install 'dask[array]')")
da = pytest.importorskip("dask.array", reason="dask.array is not installed (pip install 'dask[array]')")
db = pytest.importorskip("dask.bag", reason="dask.bag is not installed (pip install 'dask[bag]')")

import falconet  # noqa: E402

SLOTS = 2


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
def pool():
    with falconet.local(slots=SLOTS) as client:
        ex = client.executor()
        yield ex
        ex.shutdown()


def square(x):
    return x * x


def explode(x):
    raise Boom(f"bad input {x}")


def rendezvous(folder: str, me: int, others: int):
    """Mark this task started, then wait until `others` more have: only tasks running at the
    same time, in different slots, can all return.  Returns the slot's pid."""
    Path(folder, f"started-{me}").touch()
    deadline = time.monotonic() + 60
    while len(list(Path(folder).glob("started-*"))) < others + 1:
        if time.monotonic() > deadline:
            raise TimeoutError("the other tasks never ran alongside this one")
        time.sleep(0.005)
    return os.getpid()


def test_the_executor_tells_dask_how_many_slots_there_are(pool):
    assert pool._max_workers == SLOTS


def test_delayed_gives_what_the_threaded_scheduler_gives(pool):
    parts = [dask.delayed(square)(i) for i in range(40)]
    total = dask.delayed(sum)(parts)
    tree = dask.delayed(max)(total, dask.delayed(square)(total))
    ours = dask.compute(tree, parts[:5], scheduler=pool)
    theirs = dask.compute(tree, parts[:5], scheduler="threads")
    assert ours == theirs


def test_bag_gives_what_the_threaded_scheduler_gives(pool):
    words = db.from_sequence(["a", "bb", "a", "ccc", "bb", "a"] * 20, npartitions=6)
    graph = (words.frequencies(sort=True), words.map(len).sum(), words.filter(lambda w: w != "a").count())
    assert dask.compute(*graph, scheduler=pool) == dask.compute(*graph, scheduler="threads")


def test_array_gives_what_the_threaded_scheduler_gives(pool):
    x = da.arange(10_000, chunks=1000).reshape(100, 100).rechunk((25, 25))
    graph = ((x + x.T).sum(axis=0), x.dot(x.T).mean(), x.std())
    ours = dask.compute(*graph, scheduler=pool)
    theirs = dask.compute(*graph, scheduler="threads")
    for a, b in zip(ours, theirs):
        assert np.allclose(a, b)


def test_an_exception_in_a_task_reaches_the_caller(pool):
    bad = dask.delayed(explode)(3)
    with pytest.raises(Boom, match="bad input 3"):
        dask.compute(dask.delayed(sum)([bad, 1]), scheduler=pool)


def test_tasks_run_in_parallel_across_slots(pool, tmp_path):
    """Each task returns only once every other has started: run one at a time they would
    wait forever; they finish, in as many slot processes as there are slots."""
    parts = [dask.delayed(rendezvous, pure=False)(str(tmp_path), i, SLOTS - 1) for i in range(SLOTS)]
    pids = dask.compute(*parts, scheduler=pool)
    assert len(set(pids)) == SLOTS
    assert os.getpid() not in pids
