"""Data staging without sockets: the spec codec, BlobWriter, BlobStore, InputCache, run_staged."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falconet import staging
from falconet.dispatcher.blobs import BlobStore
from falconet.executor.workspace import InputCache, run_staged
from falconet.protocol import TaskState
from falconet.staging import (
    BlobWriter,
    Input,
    InputNotFound,
    Output,
    StageSpec,
    StagingError,
    decode_result_files,
    decode_spec,
    encode_result_files,
    encode_spec,
    spec_from_user,
)

DONE, FAILED = int(TaskState.DONE), int(TaskState.FAILED)
FAST = settings(max_examples=200, deadline=None)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the spec codec --------------------------------------------------------------------------

parts = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                max_size=12).filter(lambda p: p not in (".", ".."))
names = st.lists(parts, min_size=1, max_size=3).map("/".join)
digests = st.binary(min_size=32, max_size=32).map(lambda b: b.hex())
s3_urls = st.builds(lambda b, k: f"s3://{b}/{k}", st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True), names)
abs_paths = names.map(lambda n: "/" + n)


def unique(items, key=lambda x: x.name):
    seen, out = set(), []
    for item in items:
        if key(item) not in seen:
            seen.add(key(item))
            out.append(item)
    return tuple(out)


inputs = st.one_of(st.builds(lambda n, d, s: Input(n, blob=d, size=s), names, digests, st.integers(0, 2**40)),
                   st.builds(lambda n, u: Input(n, s3=u), names, s3_urls))
outputs = st.one_of(st.builds(lambda n, p: Output(n, client=p), names, abs_paths),
                    st.builds(lambda n, u: Output(n, s3=u), names, s3_urls))
specs = st.builds(lambda i, o: StageSpec(unique(i), unique(o)), st.lists(inputs, max_size=5),
                  st.lists(outputs, max_size=5))


@FAST
@given(specs)
def test_a_spec_survives_the_wire(spec):
    assert decode_spec(encode_spec(spec)) == spec


@FAST
@given(st.binary(max_size=200))
def test_garbage_bytes_raise_only_staging_error(data):
    for decode in (decode_spec, decode_result_files):
        try:
            decode(data)
        except StagingError:
            pass


scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=8)
           | st.binary(max_size=8) | names | digests | s3_urls | abs_paths)
fields = st.dictionaries(st.sampled_from(["blob", "size", "s3", "client", "path", "x"]), scalars, max_size=4)
entries = st.lists(st.one_of(st.tuples(scalars, fields).map(list), scalars, st.lists(scalars, max_size=3)),
                   max_size=4)


@FAST
@given(st.dictionaries(st.sampled_from(["in", "out", "x"]), entries | scalars, max_size=3))
def test_wellformed_msgpack_of_the_wrong_shape_raises_only_staging_error(raw):
    for decode in (decode_spec, decode_result_files):
        try:
            decode(msgpack.packb(raw))
        except StagingError:
            pass


def test_an_empty_spec_is_empty_bytes():
    assert encode_spec(StageSpec()) == b""
    assert decode_spec(b"") == StageSpec()


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../b", "a//b", "./a", "a/", "", "a\0b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(StagingError, match="file name"):
        Input(name, s3="s3://b/k")
    raw = msgpack.packb({"in": [[name, {"s3": "s3://b/k"}]], "out": []})
    with pytest.raises(StagingError):
        decode_spec(raw)


@pytest.mark.parametrize("raw, match", [
    ({"in": [["a", {"blob": "xyz", "size": 1}]], "out": []}, "sha256"),
    ({"in": [["a", {"blob": "0" * 64, "size": -1}]], "out": []}, "non-negative"),
    ({"in": [["a", {"s3": "http://b/k"}]], "out": []}, "s3://"),
    ({"in": [["a", {"s3": "s3://bucket"}]], "out": []}, "bucket or key"),
    ({"in": [["a", {"s3": "s3://b/k", "blob": "0" * 64}]], "out": []}, "input"),
    ({"in": [], "out": [["a", {"client": "rel/path"}]]}, "absolute"),
    ({"in": [["a", {"s3": "s3://b/k"}], ["a", {"s3": "s3://b/j"}]], "out": []}, "share a name"),
    ({"in": []}, "exactly the keys"),
])
def test_malformed_specs_say_what_is_wrong(raw, match):
    with pytest.raises(StagingError, match=match):
        decode_spec(msgpack.packb(raw))


def test_result_files_round_trip_and_check():
    files = [("o.txt", {"blob": "a" * 64, "size": 3, "client": "/home/u/o.txt", "path": "/var/x/o.txt"}),
             ("big", {"s3": "s3://b/big", "size": 1 << 30})]
    assert decode_result_files(encode_result_files(files)) == files
    assert encode_result_files([]) == b"" and decode_result_files(b"") == []
    with pytest.raises(StagingError):
        encode_result_files([("o", {"blob": "a" * 64, "size": 3})])  # no client path


# ---- spec_from_user and chunks -------------------------------------------------------------


def test_spec_from_user_normalises_every_form(tmp_path):
    (tmp_path / "ref.fa").write_bytes(b"ACGT")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.txt").write_bytes(b"r")
    spec, blobs = spec_from_user(
        ["ref.fa", "s3://bkt/dir/reads.fq", ("renamed/r.txt", "sub/r.txt"), ("x.bin", "s3://bkt/y")],
        ["out.txt", ("res.bam", "s3://bkt/out/res.bam"), ("log", "/tmp/elsewhere.log")], cwd=str(tmp_path))
    assert spec.inputs == (Input("ref.fa", blob=sha(b"ACGT"), size=4), Input("reads.fq", s3="s3://bkt/dir/reads.fq"),
                           Input("renamed/r.txt", blob=sha(b"r"), size=1), Input("x.bin", s3="s3://bkt/y"))
    assert spec.outputs == (Output("out.txt", client=str(tmp_path / "out.txt")),
                            Output("res.bam", s3="s3://bkt/out/res.bam"), Output("log", client="/tmp/elsewhere.log"))
    assert blobs == {sha(b"ACGT"): str(tmp_path / "ref.fa"), sha(b"r"): str(tmp_path / "sub" / "r.txt")}


def test_a_local_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "in.txt"
    path.write_bytes(b"one")
    calls = []
    real = staging.file_sha256
    monkeypatch.setattr(staging, "file_sha256", lambda p: calls.append(p) or real(p))
    for _ in range(100):
        spec, _ = spec_from_user([str(path)], [], cwd=str(tmp_path))
    assert len(calls) == 1
    path.write_bytes(b"two!")
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    spec, _ = spec_from_user([str(path)], [], cwd=str(tmp_path))
    assert len(calls) == 2 and spec.inputs[0].blob == sha(b"two!")


def test_missing_and_oversized_local_inputs_are_refused(tmp_path, monkeypatch):
    with pytest.raises(InputNotFound, match="nope.txt") as err:
        spec_from_user(["nope.txt"], [], cwd=str(tmp_path))
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "big").write_bytes(b"x" * 11)
    monkeypatch.setattr(staging, "MAX_LOCAL_FILE_BYTES", 10)
    with pytest.raises(StagingError, match="S3"):
        spec_from_user(["big"], [], cwd=str(tmp_path))
    with pytest.raises(StagingError, match="name"):
        spec_from_user([42], [], cwd=str(tmp_path))


def test_chunks_cover_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "CHUNK_BYTES", 4)
    (tmp_path / "f").write_bytes(b"0123456789")
    assert list(staging.chunks(str(tmp_path / "f"))) == [(0, b"0123"), (4, b"4567"), (8, b"89")]
    (tmp_path / "e").write_bytes(b"")
    assert list(staging.chunks(str(tmp_path / "e"))) == [(0, b"")]
    (tmp_path / "x").write_bytes(b"01234567")
    assert list(staging.chunks(str(tmp_path / "x"))) == [(0, b"0123"), (4, b"4567")]


# ---- BlobWriter ------------------------------------------------------------------------------

DATA = b"hello, staged world"


def test_blob_writer_in_order_renames_into_place(tmp_path):
    dest = tmp_path / "blob"
    w = BlobWriter(str(dest), sha(DATA), len(DATA), fsync=True)
    assert w.write(0, DATA[:5]) is False and not dest.exists()
    assert w.write(5, DATA[5:]) is True
    assert dest.read_bytes() == DATA and os.listdir(tmp_path) == ["blob"]


def test_an_empty_blob_completes_on_its_one_empty_chunk(tmp_path):
    assert BlobWriter(str(tmp_path / "e"), sha(b""), 0).write(0, b"") is True
    assert (tmp_path / "e").read_bytes() == b""


@pytest.mark.parametrize("chunks, digest, match", [
    ([(0, DATA[:5]), (6, DATA[6:])], sha(DATA), "offset 6, expected 5"),
    ([(0, DATA + b"!")], sha(DATA), "more than the declared"),
    ([(0, DATA)], sha(b"other"), "sha256"),
])
def test_blob_writer_refusals_remove_the_temp_file(tmp_path, chunks, digest, match):
    w = BlobWriter(str(tmp_path / "blob"), digest, len(DATA))
    with pytest.raises(StagingError, match=match):
        for offset, data in chunks:
            w.write(offset, data)
    assert os.listdir(tmp_path) == []
    with pytest.raises(StagingError, match="already finished"):
        w.write(0, DATA)


# ---- BlobStore -------------------------------------------------------------------------------


def put_all(store, peer, data, size=4):
    results = [store.put(peer, sha(data), off, len(data), data[off:off + size])
               for off in range(0, max(len(data), 1), size)]
    return results


def test_store_put_in_chunks_then_read_and_drop(tmp_path):
    store = BlobStore(str(tmp_path), max_bytes=1000, durable=True)
    assert put_all(store, b"c1", DATA) == [None] * 4 + [""]
    d = sha(DATA)
    assert store.has(d) and store.size(d) == len(DATA)
    assert store.read(d, 7, 6) == DATA[7:13] and store.read(d, 100, 5) == b""
    assert store.status() == {"blobs": 1, "bytes": len(DATA), "uploads": 0, "max_bytes": 1000}
    assert store.put(b"c2", d, 0, len(DATA), DATA[:4]) == ""  # already held: accepted, discarded
    store.drop([d, "f" * 64])
    assert not store.has(d) and store.status()["bytes"] == 0 and os.listdir(tmp_path) == []
    with pytest.raises(StagingError, match="not in the store"):
        store.size(d)


def test_store_refusals(tmp_path):
    store = BlobStore(str(tmp_path), max_bytes=30, durable=False, max_blob_bytes=20)
    with pytest.raises(StagingError, match="sha256"):
        store.put(b"c", "not-a-digest", 0, 1, b"x")
    with pytest.raises(StagingError, match="per-file limit"):
        store.put(b"c", sha(b"x" * 21), 0, 21, b"x")
    with pytest.raises(StagingError, match="no upload in progress"):
        store.put(b"c", sha(DATA), 4, len(DATA), DATA[4:8])
    assert store.put(b"c", sha(DATA), 0, len(DATA), DATA[:4]) is None
    with pytest.raises(StagingError, match="store full"):  # 19 reserved + 12 > 30
        store.put(b"d", sha(b"y" * 12), 0, 12, b"y" * 12)
    with pytest.raises(StagingError, match="expected 4"):
        store.put(b"c", sha(DATA), 8, len(DATA), DATA[8:])
    assert store.status()["uploads"] == 0 and os.listdir(tmp_path) == []
    with pytest.raises(StagingError, match="sha256"):
        store.put(b"c", sha(b"z" * 8), 0, 8, b"q" * 8)
    assert os.listdir(tmp_path) == [] and store.status()["bytes"] == 0


def test_a_restarted_store_keeps_its_blobs_and_drops_partials(tmp_path):
    store = BlobStore(str(tmp_path), max_bytes=1000, durable=True)
    put_all(store, b"c", DATA)
    assert store.put(b"c", sha(b"partial!"), 0, 8, b"part") is None
    assert len(os.listdir(tmp_path)) == 2
    again = BlobStore(str(tmp_path), max_bytes=1000, durable=True)
    assert again.has(sha(DATA)) and again.status() == {"blobs": 1, "bytes": len(DATA), "uploads": 0,
                                                       "max_bytes": 1000}
    assert os.listdir(tmp_path) == [sha(DATA)]


def test_forgetting_a_peer_abandons_its_uploads(tmp_path):
    store = BlobStore(str(tmp_path), max_bytes=100, durable=False)
    store.put(b"gone", sha(DATA), 0, len(DATA), DATA[:4])
    store.put(b"stay", sha(b"other"), 0, 5, b"ot")
    store.forget_peer(b"gone")
    assert store.status()["uploads"] == 1 and len(os.listdir(tmp_path)) == 1
    with pytest.raises(StagingError, match="no upload in progress"):
        store.put(b"gone", sha(DATA), 4, len(DATA), DATA[4:8])
    assert store.put(b"stay", sha(b"other"), 2, 5, b"her") == ""
    assert os.listdir(tmp_path) == [sha(b"other")]


# ---- InputCache ------------------------------------------------------------------------------


def fill(cache, data):
    assert cache.writer(sha(data), len(data)).write(0, data)
    return sha(data)


def test_cache_evicts_least_recently_used_down_to_its_size(tmp_path):
    cache = InputCache(str(tmp_path / "c"), max_bytes=25)
    a, b = fill(cache, b"a" * 10), fill(cache, b"b" * 10)
    past = time.time() - 100
    os.utime(cache.path(a), (past, past))
    os.utime(cache.path(b), (past + 1, past + 1))
    assert cache.place(a, str(tmp_path / "use-a"))  # a is now the most recently used
    c = fill(cache, b"c" * 10)
    assert cache.has(a) and not cache.has(b) and cache.has(c)
    assert cache.stats() == {"hits": 0, "misses": 0, "bytes_fetched": 0, "entries": 2, "bytes": 20,
                                  "max_bytes": 25}
    big = fill(cache, b"d" * 30)  # larger than the cache: kept (a task needs it), everything else goes
    assert [cache.has(k) for k in (a, c, big)] == [False, False, True]
    assert (tmp_path / "use-a").read_bytes() == b"a" * 10  # a placed input outlives its eviction


def test_cache_place_counts_and_entries_are_read_only(tmp_path):
    cache = InputCache(str(tmp_path / "c"), max_bytes=1000)
    assert not cache.place(sha(b"x"), str(tmp_path / "x"))
    key = fill(cache, b"x")
    assert cache.place(key, str(tmp_path / "x")) and (tmp_path / "x").read_bytes() == b"x"
    assert os.stat(cache.path(key)).st_mode & 0o222 == 0
    cache.record(True)
    cache.record(False, 1)
    assert (cache.hits, cache.misses, cache.bytes_fetched) == (1, 1, 1)
    with pytest.raises(StagingError, match="cache key"):
        cache.path("../etc")


def test_cache_add_file_moves_it_in_and_old_temp_files_are_cleaned(tmp_path):
    root = tmp_path / "c"
    cache = InputCache(str(root), max_bytes=1000)
    src = tmp_path / "download"
    src.write_bytes(b"s3 data")
    key = "s3-" + sha(b"url+etag")
    cache.add_file(key, str(src))
    assert not src.exists() and cache.has(key)
    stale, fresh = root / ".dl.old.part", root / ".dl.new.part"
    stale.write_bytes(b"")
    fresh.write_bytes(b"")
    os.utime(stale, (1, 1))
    InputCache(str(root), max_bytes=1000)
    assert not stale.exists() and fresh.exists()


# ---- run_staged ------------------------------------------------------------------------------


def shell(cmd):
    """A run callback that really runs a shell line in the work dir."""
    def run(workdir, streams):
        assert streams == {}
        proc = subprocess.run(["sh", "-c", cmd], cwd=workdir, capture_output=True)
        return (DONE if proc.returncode == 0 else FAILED), proc.stdout, "" if proc.returncode == 0 else "exit 1"
    return run


@pytest.fixture
def dirs(tmp_path):
    paths = {k: tmp_path / k for k in ("work", "cache", "outbox")}
    paths["work"].mkdir()
    return paths


def test_run_staged_with_blob_inputs_and_client_outputs(dirs):
    cache = InputCache(str(dirs["cache"]), max_bytes=1 << 20)
    key = fill(cache, b"line one\n")
    spec = StageSpec((Input("data/in.txt", blob=key, size=9),),
                     (Output("out.txt", client="/home/u/out.txt"), Output("sub/n.txt", client="/home/u/n.txt")))
    state, output, reason, files, counts = run_staged(
        encode_spec(spec), work_root=str(dirs["work"]), cache=cache, outbox=str(dirs["outbox"]),
        run=shell("cat data/in.txt > out.txt; mkdir sub; wc -l < data/in.txt > sub/n.txt; echo ran"),
        prefetched={key})
    assert (state, output, reason) == (DONE, b"ran\n", "")
    assert counts == {"hits": 0, "misses": 1, "bytes_fetched": 9}
    (name, info), (name2, info2) = decode_result_files(files)
    assert (name, info["client"], info["size"], info["blob"]) == ("out.txt", "/home/u/out.txt", 9, key)
    assert Path(info["path"]).read_bytes() == b"line one\n"
    assert info["path"].startswith(str(dirs["outbox"])) and Path(info2["path"]).read_text().strip() == "1"
    assert os.listdir(dirs["work"]) == [] and cache.has(key)
    state, *_, counts = run_staged(encode_spec(spec), work_root=str(dirs["work"]), cache=cache,
                                   outbox=str(dirs["outbox"]), run=shell("cp data/in.txt out.txt; touch sub"))
    assert counts["hits"] == 1


def test_a_missing_input_fails_before_the_run(dirs):
    cache = InputCache(str(dirs["cache"]), max_bytes=1 << 20)
    called = []
    spec = StageSpec((Input("ref.fa", blob=sha(b"absent"), size=6),), ())
    state, output, reason, files, counts = run_staged(
        encode_spec(spec), work_root=str(dirs["work"]), cache=cache, outbox=str(dirs["outbox"]),
        run=lambda wd, streams: called.append(wd) or (DONE, b"", ""))
    assert (state, files, called) == (FAILED, b"", [])
    assert "input 'ref.fa'" in reason and "not in the executor's cache" in reason
    assert counts["misses"] == 1 and os.listdir(dirs["work"]) == []


def test_a_missing_output_fails_after_the_run_keeping_its_output(dirs):
    cache = InputCache(str(dirs["cache"]), max_bytes=1 << 20)
    spec = StageSpec((), (Output("made.txt", client="/c/made.txt"), Output("x", client="/c/x")))
    state, output, reason, files, _ = run_staged(
        encode_spec(spec), work_root=str(dirs["work"]), cache=cache, outbox=str(dirs["outbox"]),
        run=shell("echo hi; echo m > made.txt"))
    assert (state, output, reason, files) == (FAILED, b"hi\n", "output 'x' was not produced", b"")
    assert os.listdir(dirs["work"]) == [] and not dirs["outbox"].exists()


def test_a_failed_run_delivers_nothing_and_a_bad_spec_fails(dirs):
    cache = InputCache(str(dirs["cache"]), max_bytes=1 << 20)
    spec = StageSpec((), (Output("o", client="/c/o"),))
    state, output, reason, files, _ = run_staged(
        encode_spec(spec), work_root=str(dirs["work"]), cache=cache, outbox=str(dirs["outbox"]),
        run=shell("echo o > o; exit 3"))
    assert (state, reason, files) == (FAILED, "exit 1", b"")
    state, _, reason, _, _ = run_staged(b"\xc1", work_root=str(dirs["work"]), cache=cache,
                                        outbox=str(dirs["outbox"]), run=shell("true"))
    assert state == FAILED and reason.startswith("staging spec:")


def test_stream_outputs_survive_the_wire_and_bad_ones_are_refused():
    spec = StageSpec((), (Output(".falconet-stdout", client="/c/1.out", stream="stdout"),
                          Output(".falconet-stderr", s3="s3://b/1.err", stream="stderr"), Output("o", client="/c/o")))
    assert decode_spec(encode_spec(spec)) == spec
    with pytest.raises(StagingError, match="not stdout or stderr"):
        Output("x", client="/c/x", stream="stdin")
    with pytest.raises(StagingError, match="same stream"):
        StageSpec((), (Output("a", client="/c/a", stream="stdout"), Output("b", client="/c/b", stream="stdout")))
    raw = msgpack.packb({"in": [], "out": [["x", {"stream": "stdout"}]]})
    with pytest.raises(StagingError, match="optional \"stream\""):
        decode_spec(raw)


def test_spec_from_user_sends_streams_to_paths_or_s3(tmp_path):
    spec, _ = spec_from_user(streams={"stdout": "logs/1.out", "stderr": "s3://b/1.err"}, cwd=str(tmp_path))
    assert spec.outputs == (Output(".falconet-stdout", client=str(tmp_path / "logs/1.out"), stream="stdout"),
                            Output(".falconet-stderr", s3="s3://b/1.err", stream="stderr"))
    assert spec_from_user(streams={"stdout": None})[0] == StageSpec()
    with pytest.raises(StagingError, match="both go to"):
        spec_from_user(streams={"stdout": "same.txt", "stderr": "same.txt"}, cwd=str(tmp_path))
    with pytest.raises(StagingError, match="streams are stdout and stderr"):
        spec_from_user(streams={"stdin": "x"})


def run_streams(cmd):
    """A run callback that runs a shell line as the runner does, streams included."""
    from falconet import tasks
    from falconet.executor import runner

    def run(cwd, streams):
        return runner.run_command(tasks.decode_command(tasks.encode_command(cmd)), 0.0, cwd, streams)
    return run


def test_stream_outputs_run_where_plain_tasks_do_and_are_delivered_even_on_failure(dirs, tmp_path, monkeypatch):
    from falconet import tasks

    monkeypatch.chdir(tmp_path)
    cache = InputCache(str(dirs["cache"]), max_bytes=1 << 20)
    spec = StageSpec((), (Output(".falconet-stdout", client="/c/3.out", stream="stdout"),
                          Output(".falconet-stderr", client="/c/3.err", stream="stderr")))
    state, output, reason, files, _ = run_staged(
        encode_spec(spec), work_root=str(dirs["work"]), cache=cache, outbox=str(dirs["outbox"]),
        run=run_streams("pwd; head -c 3000000 /dev/zero; echo bad >&2; exit 4"))
    assert (state, reason) == (FAILED, "exit code 4")
    assert tasks.decode_command_output(output) == (4, "", "", False)  # nothing captured, nothing cut
    got = {name: Path(info["path"]).read_bytes() for name, info in decode_result_files(files)}
    assert got[".falconet-stdout"] == f"{tmp_path}\n".encode() + bytes(3_000_000)
    assert got[".falconet-stderr"] == b"bad\n"
    assert os.listdir(dirs["work"]) == []


def test_a_stream_over_the_dispatcher_s_file_limit_fails_with_the_reason(dirs, monkeypatch):
    import falconet.executor.workspace as executor_workspace

    monkeypatch.setattr(executor_workspace, "MAX_LOCAL_FILE_BYTES", 1000)
    cache = InputCache(str(dirs["cache"]), max_bytes=1 << 20)
    spec = StageSpec((), (Output(".falconet-stdout", client="/c/1.out", stream="stdout"),))
    state, _, reason, files, _ = run_staged(
        encode_spec(spec), work_root=str(dirs["work"]), cache=cache, outbox=str(dirs["outbox"]),
        run=run_streams("head -c 2000 /dev/zero"))
    assert (state, files) == (FAILED, b"")
    assert reason.startswith("its stdout is 2000 bytes, over the 0 MiB limit") and "s3://" in reason


# ---- the dispatcher's holds and streams -----------------------------------------------------


def _held_store(tmp_path: Path, data: bytes) -> tuple[BlobStore, str]:
    store = BlobStore(str(tmp_path / "blobs"), max_bytes=1 << 30, durable=False)
    digest = sha(data)
    assert store.put(b"c", digest, 0, len(data), data) == ""
    return store, digest


def test_a_blob_stays_while_anyone_holds_it_and_goes_with_the_last_hold(tmp_path):
    from falconet.dispatcher.blobs import Holds

    store, digest = _held_store(tmp_path, b"shared")
    holds = Holds(store)
    holds.add(b"client-a", [digest])  # an input uploaded
    holds.add(b"executor:e", [digest])  # the same content uploaded as an output: pinned
    holds.release(b"client-a", [digest])
    assert store.has(digest), "the executor's pin keeps it"
    holds.hand_over(b"executor:e", b"client-b", {digest})  # the result came: client b holds it
    holds.release(b"client-a", [digest])  # a release of a hold it no longer has changes nothing
    assert store.has(digest)
    holds.release(b"client-b", [digest])
    assert not store.has(digest)


def test_a_second_upload_of_held_content_holds_it_from_its_first_chunk(tmp_path):
    """Three tasks with the same big output: the executor uploads it before each result.
    The second upload is discarded chunk by chunk (the content is here), and it must hold
    the blob from its first chunk: the client done with the first result's copy must not
    drop it while the second still comes (its result would name a blob gone)."""
    from falconet.dispatcher.blobs import Holds

    data = bytes(range(256)) * 8
    store = BlobStore(str(tmp_path / "blobs"), max_bytes=1 << 30, durable=False)
    holds = Holds(store)
    digest, pin = sha(data), b"executor:e"
    chunks = [(0, data[:1024]), (1024, data[1024:])]
    for offset, part in chunks:  # the first upload: its hold comes with its last chunk
        done = store.put(b"executor:e", digest, offset, len(data), part)
        took = done is not None and holds.upload_chunk(pin, digest, offset + len(part) == len(data))
        assert took == (offset == 1024)
    holds.hand_over(pin, b"client", {digest})  # the first result is in
    offset, part = chunks[0]  # the second upload starts
    assert store.put(b"executor:e", digest, offset, len(data), part) == ""
    assert holds.upload_chunk(pin, digest, last=False)
    holds.release(b"client", [digest])  # the client fetched the first output and let it go
    assert store.has(digest), "the second upload holds it"
    offset, part = chunks[1]
    assert store.put(b"executor:e", digest, offset, len(data), part) == ""
    assert not holds.upload_chunk(pin, digest, last=True)  # one hold per upload
    holds.hand_over(pin, b"client", {digest})
    holds.release(b"client", [digest])
    assert not store.has(digest) and not holds.counts and not holds.uploading


def test_a_gone_executor_lifts_its_pins(tmp_path):
    from falconet.dispatcher.blobs import Holds

    store, digest = _held_store(tmp_path, b"out")
    holds = Holds(store)
    holds.add(b"executor:e", [digest], 2)
    holds.drop_holder(b"executor:e")
    assert not store.has(digest)


def test_windows_of_one_blob_go_to_a_peer_as_one_ordered_stream(tmp_path):
    from falconet.dispatcher.blobs import Streams

    data = bytes(range(256)) * 40  # 10,240 bytes: windows of 4,096, chunks of 1,024
    store, digest = _held_store(tmp_path, data)
    streams = Streams(store, window=4096, chunk=1024, per_peer=2)
    got: list[tuple[int, bytes]] = []

    def send(dest, peer, msg):
        got.append((msg.offset, msg.data))
        return True

    from falconet.protocol import BlobData as make

    assert streams.ask("sock", b"p", digest, 0, len(data)) is True, "a new fetch"
    streams.pump(2048, send, make)  # part of the first window
    assert streams.ask("sock", b"p", digest, 4096, len(data)) is False  # the next window extends it
    streams.pump(1 << 20, send, make)
    assert not streams, "both windows sent: the stream ended"
    assert streams.ask("sock", b"p", digest, 8192, len(data)) is False, "the last window: not a new fetch"
    streams.pump(1 << 20, send, make)
    offsets = [o for o, _ in got]
    assert offsets == sorted(offsets) == list(range(0, len(data), 1024)), "in order, each chunk once"
    assert b"".join(d for _, d in got) == data
    assert not streams


# ---- Downloads: the fetches one peer has under way -------------------------------------------


@given(data=st.binary(min_size=1, max_size=3 * staging.FETCH_WINDOW // 2), chunk=st.sampled_from([1 << 20, 300_000]))
@settings(max_examples=15, deadline=None)
def test_downloads_ask_window_by_window_and_end_with_the_whole_file(tmp_path_factory, data, chunk):
    dest = tmp_path_factory.mktemp("dl") / "out.bin"
    digest = hashlib.sha256(data).hexdigest()
    fetches = staging.Downloads()
    ask = fetches.begin(digest, lambda total: staging.BlobWriter(str(dest), digest, total), now=0.0)
    assert ask == (digest, 0) and digest in fetches and len(fetches) == 1
    assert fetches.begin(digest, lambda total: None, now=0.0) is None  # under way: asked once
    asked, offset, ended = [0], 0, False
    while not ended:
        piece = data[offset:offset + chunk]
        ended, more, error = fetches.feed(digest, offset, len(data), piece, "", now=1.0)
        assert error == ""
        if more is not None:
            asked.append(more[1])
        offset += len(piece)
    assert dest.read_bytes() == data and digest not in fetches
    assert asked == list(range(0, len(data), staging.FETCH_WINDOW))  # each window asked for once, in order


def test_downloads_forget_a_failed_fetch_and_ignore_stale_chunks(tmp_path):
    data = b"x" * 1000
    digest = hashlib.sha256(data).hexdigest()
    fetches = staging.Downloads()
    fetches.begin(digest, lambda total: staging.BlobWriter(str(tmp_path / "o"), digest, total), now=0.0)
    assert fetches.feed(digest, 500, 1000, data[500:], "", now=1.0) == (False, None, "")  # out of sequence
    assert fetches.again(now=2.0, only_stalled=True) == []
    assert fetches.again(now=2.0 + staging.FETCH_STALL_S, only_stalled=True) == [(digest, 0)]
    ended, ask, error = fetches.feed(digest, 0, 1000, b"", "blob not found", now=3.0)
    assert (ended, ask, error) == (True, None, "blob not found") and len(fetches) == 0
    assert fetches.feed(digest, 0, 1000, data, "", now=4.0) == (False, None, "")  # no longer under way
    assert not (tmp_path / "o").exists()
