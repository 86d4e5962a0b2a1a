"""Data staging end to end: files through the dispatcher's blob store and through S3 (moto's
server on loopback), private work dirs, delivered outputs, and the executors' input cache."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest
from cluster_helpers import wait_until

import falconet

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}


def _count_lines(name: str) -> int:
    with open(name, "rb") as f:  # relative: the task runs in its private work dir
        return sum(1 for _ in f)


def _where_am_i() -> str:
    return os.getcwd()


@pytest.fixture
def two(cluster, tmp_path):
    cluster.start_dispatcher()
    for name in ("a", "b"):
        cluster.start_executor(name, 2, "--work-dir", str(tmp_path / f"work-{name}"))
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"a", "b"}, what="two executors")
        yield client


def test_inputs_and_outputs_travel_through_the_dispatcher(two, tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_bytes(b"line\n" * 1000)
    out_dir = tmp_path / "results"
    futures = [two.submit_command(f"wc -l < ref.txt > n{i}.txt && echo {i} >> n{i}.txt",
                                  inputs=[str(ref)], outputs=[(f"n{i}.txt", str(out_dir / f"n{i}.txt"))])
               for i in range(6)]
    for i, f in enumerate(futures):
        result = f.result(timeout=60)
        assert result.ok, result.stderr
        assert result.outputs == {f"n{i}.txt": str(out_dir / f"n{i}.txt")}
        assert (out_dir / f"n{i}.txt").read_text().split() == ["1000", str(i)]
    assert two.submit_python(_count_lines, ("ref.txt",), inputs=[str(ref)]).result(timeout=30) == 1000


def test_outputs_equal_to_inputs_or_to_each_other_keep_every_blob_until_released(two, tmp_path):
    """One blob can be an input and several outputs at once: releasing one must not delete it
    for the others; once every task is over and its outputs fetched, the store is empty."""
    src = tmp_path / "in.txt"
    src.write_text("same\n")
    copies = [two.submit_command("cp in.txt out.txt", inputs=[str(src)],
                                 outputs=[("out.txt", str(tmp_path / f"copy{i}.txt"))]) for i in range(4)]
    empties = [two.submit_command(": > e.txt", outputs=[("e.txt", str(tmp_path / f"empty{i}.txt"))])
               for i in range(4)]
    for f in copies + empties:
        assert f.result(timeout=60).ok, f.result().reason
    assert all((tmp_path / f"copy{i}.txt").read_text() == "same\n" for i in range(4))
    assert all((tmp_path / f"empty{i}.txt").read_bytes() == b"" for i in range(4))
    again = two.submit_command("cat in.txt", inputs=[str(src)])  # the same content, uploaded again
    assert again.result(timeout=60).stdout == "same\n"
    wait_until(lambda: two.status()["blobs"]["blobs"] == 0, what="every blob released")


def test_an_input_rewritten_between_submits_reaches_each_task_as_it_was(two, tmp_path):
    params = tmp_path / "params.txt"
    futures = []
    for i in range(10):
        params.write_text(f"value {i}\n")  # same size every time: only the content changes
        futures.append(two.submit_command("cat params.txt", inputs=[str(params)]))
    assert [f.result(timeout=60).stdout for f in futures] == [f"value {i}\n" for i in range(10)]


def test_a_large_input_crosses_to_each_executor_once_and_then_comes_from_the_cache(two, tmp_path):
    ref = tmp_path / "genome.fa"
    ref.write_bytes(os.urandom(3 << 20))  # three chunks
    digest = hashlib.sha256(ref.read_bytes()).hexdigest()
    futures = [two.submit_command("sha256sum genome.fa", inputs=[str(ref)]) for _ in range(40)]
    ran_on = set()
    for f in futures:
        result = f.result(timeout=60)
        assert result.ok and result.stdout.split()[0] == digest
        ran_on.add(f.info.executor)
    status = wait_until(lambda: (s := two.status()) and s["input_cache"]["hits"] + s["input_cache"]["misses"] >= 40
                        and s, what="every executor's cache counts reported")
    assert status["blobs"]["fetches"] == len(ran_on), "the file crossed once per executor that ran a task"
    assert status["input_cache"]["misses"] == len(ran_on)
    assert status["input_cache"]["hits"] == 40 - len(ran_on)
    assert status["input_cache"]["bytes_fetched"] == len(ran_on) * (3 << 20)
    rows = two.status(detail=True)["executor_table"]
    assert sum(r["stats"]["cache"]["hits"] for r in rows) == 40 - len(ran_on)


def test_each_task_gets_a_private_work_dir_that_is_removed_after(two, tmp_path):
    ref = tmp_path / "x.txt"
    ref.write_text("x")
    dirs = [two.submit_python(_where_am_i, inputs=[str(ref)]) for _ in range(4)]
    seen = [f.result(timeout=30) for f in dirs]
    assert len(set(seen)) == 4, "one work dir per task"
    assert not any(os.path.exists(d) for d in seen), "work dirs are removed when their task ends"


def test_a_missing_output_fails_the_task_and_a_missing_input_is_refused_at_submit(two, tmp_path):
    f = two.submit_command("true", outputs=["never.txt"])
    result = f.result(timeout=30)
    assert not result.ok and "output 'never.txt' was not produced" in result.reason
    with pytest.raises(falconet.FalconetError, match="does not exist"):
        two.submit_command("true", inputs=[str(tmp_path / "absent.txt")])


# ---------------------------------------------------------------- S3


@pytest.fixture
def s3_fleet(cluster, tmp_path, moto_url, monkeypatch):
    """Executors that reach moto's S3: the environment they inherit names it."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in {**FAKE_AWS, "FALCONET_S3_ENDPOINT_URL": moto_url}.items():
        monkeypatch.setenv(name, value)
    from falconet.executor.workspace import s3_client

    s3 = s3_client()
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    cluster.start_dispatcher()
    cluster.start_executor("s3", 2, "--work-dir", str(tmp_path / "work"))
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"s3"}, what="the executor")
        yield client, s3, bucket


def test_s3_inputs_and_a_large_multipart_output_end_to_end(s3_fleet, tmp_path):
    client, s3, bucket = s3_fleet
    data = os.urandom(20 << 20)
    s3.put_object(Bucket=bucket, Key="in/big.bin", Body=data)
    url_in, url_out = f"s3://{bucket}/in/big.bin", f"s3://{bucket}/out/copy.bin"
    first = client.submit_command("cat big.bin big.bin > copy.bin", inputs=[url_in], outputs=[("copy.bin", url_out)])
    result = first.result(timeout=120)
    assert result.ok, result.reason
    assert result.outputs == {"copy.bin": url_out}
    head = s3.head_object(Bucket=bucket, Key="out/copy.bin")
    assert head["ContentLength"] == 40 << 20 and "-" in head["ETag"].strip('"'), "uploaded in parts"
    body = s3.get_object(Bucket=bucket, Key="out/copy.bin")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data + data).digest()
    again = [client.submit_command("wc -c < big.bin", inputs=[url_in]) for _ in range(3)]
    assert all(f.result(timeout=60).stdout.strip() == str(20 << 20) for f in again)
    cache = wait_until(lambda: (c := client.status()["input_cache"])["hits"] >= 3 and c, what="cache hits")
    assert cache["misses"] == 1 and cache["bytes_fetched"] == 20 << 20


def test_a_missing_s3_input_fails_before_the_command_runs(s3_fleet, tmp_path):
    client, _, bucket = s3_fleet
    marker = tmp_path / "ran"
    f = client.submit_command(f"touch {marker}", inputs=[f"s3://{bucket}/no/such.key"])
    with pytest.raises(falconet.TaskError, match=r"input 'such.key' from s3://.*no/such.key"):
        f.result(timeout=60)
    assert not Path(marker).exists()


def test_large_inputs_fetched_together_stream_in_order_without_restarts(cluster, tmp_path):
    """Several 20 MiB inputs at once on one executor: each crosses once, in order (a window
    that arrived out of order would be dropped and the fetch started again)."""
    cluster.start_dispatcher()
    cluster.start_executor("one", 2, "--work-dir", str(tmp_path / "work"))
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"one"}, what="the executor")
        files = []
        for i in range(4):
            f = tmp_path / f"big{i}.bin"
            f.write_bytes(os.urandom(20 << 20))
            files.append(f)
        futures = [client.submit_command(f"sha256sum {f.name}", inputs=[str(f)]) for f in files]
        for f, fut in zip(files, futures):
            assert fut.result(timeout=60).stdout.split()[0] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert client.status()["blobs"]["fetches"] == 4, "a fetch was started again"
        assert "again from the start" not in (tmp_path / "one.log").read_text()


def test_two_clients_sharing_an_input_both_release_it(cluster, tmp_path):
    cluster.start_dispatcher()
    cluster.start_executor("one", 2, "--work-dir", str(tmp_path / "work"))
    ref = tmp_path / "shared.bin"
    ref.write_bytes(os.urandom(3 << 20))  # several chunks
    with cluster.client() as first, cluster.client() as second:
        wait_until(lambda: cluster.registered(first) == {"one"}, what="the executor")
        a = first.submit_command("wc -c < shared.bin", inputs=[str(ref)])
        assert a.result(timeout=60).stdout.strip() == str(3 << 20)
        b = second.submit_command("wc -c < shared.bin", inputs=[str(ref)])  # the store holds it already
        assert b.result(timeout=60).stdout.strip() == str(3 << 20)
        wait_until(lambda: first.status()["blobs"]["blobs"] == 0, what="the shared input released by both")
