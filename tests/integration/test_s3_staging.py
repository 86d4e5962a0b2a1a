"""Executor-side S3 staging against moto's S3 server on loopback (boto3 is never patched)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from falconet.errors import StagingError
from falconet.executor.workspace import InputCache, fetch_s3, run_staged, s3_client, upload_s3
from falconet.protocol import TaskState
from falconet.staging import Input, Output, StageSpec, decode_result_files, encode_spec

DONE, FAILED = int(TaskState.DONE), int(TaskState.FAILED)
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture
def aws_env(monkeypatch, moto_url):
    """Only fake keys and the loopback endpoint: no real profile, key, proxy or metadata probe."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name)
    for name, value in {**FAKE_KEYS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
                        "FALCONET_S3_ENDPOINT_URL": moto_url}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3(aws_env):
    return s3_client()


@pytest.fixture
def bucket(s3):
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def cache(tmp_path):
    return InputCache(str(tmp_path / "cache"), max_bytes=1 << 30)


def test_fetch_goes_through_the_cache_and_notices_a_changed_object(s3, bucket, cache, tmp_path):
    url = f"s3://{bucket}/dir/ref.fa"
    s3.put_object(Bucket=bucket, Key="dir/ref.fa", Body=b"ACGT")
    assert fetch_s3(s3, url, str(tmp_path / "a"), cache) is False
    assert fetch_s3(s3, url, str(tmp_path / "b"), cache) is True
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == b"ACGT"
    s3.put_object(Bucket=bucket, Key="dir/ref.fa", Body=b"TTTT")
    assert fetch_s3(s3, url, str(tmp_path / "c"), cache) is False
    assert (tmp_path / "c").read_bytes() == b"TTTT"
    assert (cache.hits, cache.misses, cache.bytes_fetched) == (1, 2, 8)


def test_a_large_file_goes_up_multipart_and_comes_back_identical(s3, bucket, cache, tmp_path):
    data = os.urandom(20 << 20)
    (tmp_path / "big").write_bytes(data)
    multipart = []
    s3.meta.events.register("before-call.s3.CreateMultipartUpload", lambda **kw: multipart.append(1))
    url = f"s3://{bucket}/big.bin"
    assert upload_s3(s3, str(tmp_path / "big"), url) == len(data)
    assert multipart == [1] and "-" in s3.head_object(Bucket=bucket, Key="big.bin")["ETag"]
    assert fetch_s3(s3, url, str(tmp_path / "back"), cache) is False
    back = (tmp_path / "back").read_bytes()
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()


def test_s3_errors_name_the_url_and_what_is_wrong(s3, bucket, cache, tmp_path, monkeypatch):
    with pytest.raises(StagingError, match=f"s3://{bucket}/nope: NoSuchKey"):
        fetch_s3(s3, f"s3://{bucket}/nope", str(tmp_path / "x"), cache)
    with pytest.raises(StagingError, match="s3://no-such-bucket-here/k: NoSuchBucket"):
        fetch_s3(s3, "s3://no-such-bucket-here/k", str(tmp_path / "x"), cache)
    (tmp_path / "f").write_bytes(b"f")
    with pytest.raises(StagingError, match="s3://no-such-bucket-here/k: NoSuchBucket"):
        upload_s3(s3, str(tmp_path / "f"), "s3://no-such-bucket-here/k")
    for name in FAKE_KEYS:
        monkeypatch.delenv(name)
    with pytest.raises(StagingError, match="no AWS credentials"):
        fetch_s3(s3_client(), f"s3://{bucket}/nope", str(tmp_path / "x"), cache)
    assert not (tmp_path / "x").exists() and cache.stats()["entries"] == 0


def test_an_object_changed_during_the_fetch_is_not_cached(s3, bucket, cache, tmp_path):
    s3.put_object(Bucket=bucket, Key="k", Body=b"old")
    writer = s3_client()
    changed = []

    def change(**_):
        if not changed:
            changed.append(writer.put_object(Bucket=bucket, Key="k", Body=b"new!"))

    s3.meta.events.register("after-call.s3.HeadObject", change)  # after fetch_s3's first look
    with pytest.raises(StagingError, match="PreconditionFailed"):
        fetch_s3(s3, f"s3://{bucket}/k", str(tmp_path / "x"), cache)
    assert changed and not (tmp_path / "x").exists() and cache.stats()["entries"] == 0
    assert os.listdir(cache.root) == []


def shell(cmd):
    def run(workdir, _streams):
        proc = subprocess.run(["sh", "-c", cmd], cwd=workdir, capture_output=True)
        return (DONE if proc.returncode == 0 else FAILED), proc.stdout, ""
    return run


def test_run_staged_with_s3_input_and_outputs(s3, bucket, cache, tmp_path):
    s3.put_object(Bucket=bucket, Key="in/reads.txt", Body=b"r1\nr2\nr3\n")
    spec = StageSpec((Input("reads.txt", s3=f"s3://{bucket}/in/reads.txt"),),
                     (Output("count.txt", s3=f"s3://{bucket}/out/count.txt"),
                      Output("copy.txt", client="/home/u/copy.txt")))
    work, outbox = tmp_path / "work", tmp_path / "outbox"
    work.mkdir()
    state, output, reason, files, counts = run_staged(
        encode_spec(spec), work_root=str(work), cache=cache, outbox=str(outbox),
        run=shell("wc -l < reads.txt > count.txt; cp reads.txt copy.txt"))  # s3 client from the environment
    assert (state, reason, counts) == (DONE, "", {"hits": 0, "misses": 1, "bytes_fetched": 9})
    assert s3.get_object(Bucket=bucket, Key="out/count.txt")["Body"].read().strip() == b"3"
    (n1, i1), (n2, i2) = decode_result_files(files)
    assert (n1, i1["s3"]) == ("count.txt", f"s3://{bucket}/out/count.txt")
    assert (n2, i2["client"], Path(i2["path"]).read_bytes()) == ("copy.txt", "/home/u/copy.txt", b"r1\nr2\nr3\n")
    assert os.listdir(work) == []


def test_run_staged_with_a_missing_s3_input_fails_before_running(s3, bucket, cache, tmp_path):
    called = []
    spec = StageSpec((Input("ref.fa", s3=f"s3://{bucket}/missing.fa"),), ())
    (tmp_path / "work").mkdir()
    state, _, reason, files, _ = run_staged(
        encode_spec(spec), work_root=str(tmp_path / "work"), cache=cache, outbox=str(tmp_path / "outbox"),
        run=lambda wd, _streams: called.append(wd) or (DONE, b"", ""), s3=s3)
    assert (state, files, called) == (FAILED, b"", [])
    assert reason.startswith(f"input 'ref.fa' from s3://{bucket}/missing.fa: NoSuchKey")


def test_run_staged_reports_a_failed_s3_upload(s3, bucket, cache, tmp_path):
    spec = StageSpec((), (Output("o.txt", s3="s3://no-such-bucket-here/o.txt"),))
    (tmp_path / "work").mkdir()
    state, output, reason, files, _ = run_staged(
        encode_spec(spec), work_root=str(tmp_path / "work"), cache=cache, outbox=str(tmp_path / "outbox"),
        run=shell("echo made > o.txt; echo ok"), s3=s3)
    assert (state, output, files) == (FAILED, b"ok\n", b"")
    assert reason.startswith("output 'o.txt' to s3://no-such-bucket-here/o.txt: NoSuchBucket")


def test_a_failed_command_s_stderr_still_goes_up_to_s3(s3, bucket, cache, tmp_path):
    from falconet import tasks
    from falconet.executor import runner

    spec = StageSpec((), (Output(".falconet-stderr", s3=f"s3://{bucket}/logs/1.err", stream="stderr"),))
    body = tasks.decode_command(tasks.encode_command("echo why >&2; exit 5"))
    (tmp_path / "work").mkdir()
    state, _, reason, files, _ = run_staged(
        encode_spec(spec), work_root=str(tmp_path / "work"), cache=cache, outbox=str(tmp_path / "outbox"),
        run=lambda cwd, streams: runner.run_command(body, 0.0, cwd, streams), s3=s3)
    assert (state, reason) == (FAILED, "exit code 5")
    assert decode_result_files(files) == [(".falconet-stderr", {"s3": f"s3://{bucket}/logs/1.err", "size": 4})]
    assert s3.get_object(Bucket=bucket, Key="logs/1.err")["Body"].read() == b"why\n"
