"""The client's side of staging: inputs counted by the tasks that hold them, outputs held until written."""

from __future__ import annotations

import hashlib

from falconet import protocol as p
from falconet.client_files import InputRefs, OutputFetches, Released

DONE = int(p.TaskState.DONE)


def result(seq: int) -> p.TaskResult:
    return p.TaskResult(seq, DONE, b"", "", "ex", 1, 0.0, 0.0, 0.0)


def test_one_blob_for_two_tasks_and_places_is_fetched_once_and_copied(tmp_path):
    data = b"same content"
    digest = hashlib.sha256(data).hexdigest()
    a, b = str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out")
    f = OutputFetches()
    assert f.hold(result(1), {(digest, a)}, now=0.0) == [p.GetBlob(digest, 0)]
    assert f.hold(result(2), {(digest, b)}, now=0.0) == []  # under way already
    assert 1 in f and 2 in f and len(f) == 1
    asks, drops, released = f.feed(p.BlobData(digest, 0, len(data), data, ""), now=1.0)
    assert asks == [] and drops == [digest, digest]  # one release per result that held it
    assert released == [Released(result(1), ""), Released(result(2), "")]
    assert (tmp_path / "a" / "out").read_bytes() == (tmp_path / "b" / "out").read_bytes() == data
    assert 1 not in f and len(f) == 0


def test_a_refused_blob_releases_its_result_with_the_reason(tmp_path):
    digest = hashlib.sha256(b"x").hexdigest()
    f = OutputFetches()
    f.hold(result(1), {(digest, str(tmp_path / "o"))}, now=0.0)
    _, drops, [(r, error)] = f.feed(p.BlobData(digest, 0, 0, b"", "no such blob"), now=0.0)
    assert r.seq == 1 and "could not be fetched from the dispatcher: no such blob" in error
    assert drops == [digest] and not (tmp_path / "o").exists()


def test_a_result_waits_for_all_its_files(tmp_path):
    one, two = b"one", b"two"
    d1, d2 = hashlib.sha256(one).hexdigest(), hashlib.sha256(two).hexdigest()
    f = OutputFetches()
    f.hold(result(1), {(d1, str(tmp_path / "1")), (d2, str(tmp_path / "2"))}, now=0.0)
    assert f.feed(p.BlobData(d1, 0, 3, one, ""), now=0.0)[2] == []
    assert f.feed(p.BlobData(d2, 0, 3, two, ""), now=0.0)[2] == [Released(result(1), "")]


def test_stalled_fetches_are_asked_again_and_abort_releases_everything(tmp_path):
    digest = hashlib.sha256(b"x").hexdigest()
    f = OutputFetches()
    f.hold(result(1), {(digest, str(tmp_path / "o"))}, now=0.0)
    assert f.again(1.0, only_stalled=True) == []
    assert f.again(1000.0, only_stalled=True) == [p.GetBlob(digest, 0)]
    assert f.again(1000.0, only_stalled=False) == [p.GetBlob(digest, 0)]
    assert f.abort_all() == [digest]
    assert 1 not in f and len(f) == 0
    assert f.feed(p.BlobData(digest, 0, 1, b"x", ""), now=0.0) == ([], [], [])  # a late chunk


def test_an_input_is_needed_until_the_last_task_naming_it_is_over():
    refs = InputRefs()
    assert "d1" not in refs
    refs.hold("d1", 2)
    refs.hold("d2", 1)
    assert "d1" in refs
    assert refs.release(("d1", "d2")) == ["d2"]
    assert refs.release(("d1",)) == ["d1"]
    assert "d1" not in refs and refs.release(("d1",)) == ["d1"]  # released twice: still once unneeded
