"""Fuzz both dispatcher ports with hypothesis-made frames while a real workload runs.

Random bytes, msgpack of every shape, real message tags with wrong fields, truncated real
messages, headers that promise gigabytes, and multi-part messages go to the client port and
the executor port from peers of their own.  The workload beside them must finish with the
right results, the dispatcher must keep answering, and its memory must stay bounded.
"""

from __future__ import annotations

import msgpack
import psutil
import zmq
from cluster_helpers import dealer, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cluster import slow_identity

from falconet import protocol as p

WORKLOAD = 3000
MEMORY_SLACK = 48 << 20  # bytes of dispatcher RSS growth the fuzzing may cause, at most

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                  st.text(max_size=20), st.binary(max_size=40))
_values = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=5)),
                       max_leaves=25)
_real = [p.encode(m) for m in (
    p.Hello(p.PROTOCOL_VERSION, "fuzz", "fuzz"), p.Submit(1, [p.TaskSpec(1, 1, b"x" * 30, 3, 0.0)]),
    p.Register(p.PROTOCOL_VERSION, "fz", "h", ["10.0.0.1"], 1, 1, "x", 1, 1, {}, []),
    # No Report with results: without keys a peer that registers *is* an executor, and may
    # return forged results for what it was given (docs/reliability.md); CURVE stops that.
    p.Report(0, [(1, 1)], []), p.Ack([1, 2, 3]),
    p.StatusRequest(1, True), p.Release(["nobody"], "fuzz"), p.Drain([(1, 1)]))]
_huge = [b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
         b"\x92\x02\xdd\x7f\xff\xff\xff", b"\xdb\xff\xff\xff\xff"]

frames = st.one_of(
    st.binary(max_size=512),
    _values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.tuples(st.sampled_from([int(t) for t in p.MsgType]), st.lists(_values, max_size=12))
    .map(lambda t: msgpack.packb([t[0], *t[1]], use_bin_type=True)),
    st.tuples(st.sampled_from(_real), st.floats(0, 1)).map(lambda t: t[0][:int(len(t[0]) * t[1])]),
    st.sampled_from(_huge + _real),
)
messages = st.lists(frames, min_size=1, max_size=4)  # one ZeroMQ message of 1-4 frames


def test_fuzzing_both_ports_leaves_a_real_workload_untouched(cluster):
    cluster.start_dispatcher()
    cluster.start_executor("ex", 2)
    ctx = zmq.Context()
    fuzzers = [dealer(ctx, a) for a in (cluster.client_address, cluster.executor_address)]
    dispatcher = psutil.Process(cluster.dispatcher.pid)
    rss: list[int] = []
    try:
        with cluster.client() as client:
            futures = client.map(slow_identity, range(WORKLOAD))

            @settings(max_examples=300, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(st.lists(messages, min_size=1, max_size=8))
            def fuzz(batch):
                for message in batch:
                    for sock in fuzzers:
                        sock.send_multipart(message)
                if len(rss) % 50 == 0:
                    assert cluster.dispatcher.poll() is None, "the dispatcher died"
                rss.append(dispatcher.memory_info().rss)

            fuzz()
            assert list(futures) == list(range(WORKLOAD))
            status = client.status()
            assert status["tasks"]["done"] >= WORKLOAD
            # the executor that fuzz frames may have registered is forgotten once silent
            wait_until(lambda: cluster.registered(client) == {"ex"}, timeout_s=30,
                       what="only the real executor registered")
            assert client.submit(slow_identity, 7).result(timeout=30) == 7
        growth = max(rss) - rss[len(rss) // 10]
        assert growth < MEMORY_SLACK, f"dispatcher RSS grew {growth / 1e6:.1f} MB while fuzzed"
        print(f"{len(rss)} fuzz rounds; dispatcher RSS {rss[0] / 1e6:.1f} -> {max(rss) / 1e6:.1f} MB")
    finally:
        for sock in fuzzers:
            sock.close(0)
        ctx.term()
    assert cluster.dispatcher.poll() is None
