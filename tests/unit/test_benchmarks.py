"""benchmarks/: the parts that must follow the code they measure."""

from __future__ import annotations

from falconet.benchmarks import dispatch


def test_the_dispatch_bench_speaks_this_protocol():
    """Its helpers encode frames by hand (no falconet import in their processes): a protocol
    change must update them, or `falconet bench` fails at start."""
    dispatch._check_protocol()


def test_helpers_fit_their_file_limit_and_spread_their_sources():
    """54,000 executors under a hard limit of 20,000 descriptors: each helper holds what its
    limit allows (two descriptors a socket), no source address carries more than its share
    of ports, and every address is on loopback and used once."""
    plan = dispatch._host_plan(54_000, 20_000)
    assert sum(k for _, k in plan) == 54_000
    assert all(2 * k + dispatch._FD_RESERVE <= 20_000 for _, k in plan)
    assert all(k <= len(sources) * dispatch._PER_SOURCE for sources, k in plan)
    everyone = [a for sources, _ in plan for a in sources]
    assert len(set(everyone)) == len(everyone)
    assert all(a.startswith("127.") for a in everyone)


def test_a_small_fleet_keeps_two_helpers_and_the_systems_source_address():
    """The quick run's 1,000 executors connect as before: no 127.x beyond 127.0.0.1 needed."""
    assert dispatch._host_plan(1000, 20_000) == [([], 500), ([], 500)]


def test_the_dispatcher_holds_a_descriptor_per_executor():
    assert dispatch.max_executors(20_000) == 20_000 - dispatch._FD_RESERVE
    assert dispatch.max_executors(100) == 0


def test_a_connection_from_a_source_address_stays_on_that_port():
    assert dispatch._from("127.1.0.3", "tcp://127.0.0.1:5555") == "tcp://127.1.0.3:0;127.0.0.1:5555"


def test_a_scale_row_the_file_limit_forbids_is_reported_not_run():
    from falconet.benchmarks import harness

    row = harness.scale_row(harness.FULL, 10 ** 9, dispatch)
    assert "skipped" in row
    assert "not run" in harness.scale_line(row)
    r = {"dispatch": {"rows": [{"executors": 10, "tasks_per_s": {"median": 1.0}}], "bare_zmq_10": {"median": 1.0}},
         "scale": [{"executors": 54_000, "skipped": row["skipped"]}]}
    assert ("dispatch with 54,000 executors / with 10" in {t[0] for t in harness.targets(r)})
    assert [t[3] for t in harness.targets(r) if "54,000" in t[0]] == [None]


def test_a_scale_row_reports_registration_memory_and_heartbeats():
    from falconet.benchmarks import harness

    row = {"executors": 54_000, "registered_s": 20.0, "tasks_per_s": 9e4, "tasks_per_s_min": 8e4,
           "tasks_per_s_max": 1e5, "bytes_per_executor": 30_720.0, "idle_cpu_per_s": 0.1}
    line = harness.scale_line(row)
    assert "registered in 20.0s" in line and "30.0 KiB" in line and "0.100 CPU-s/s" in line


def test_the_latency_floor_runs_through_four_processes_and_leaves_none():
    """benchmarks/hops.py: every message comes back (recv would block otherwise), and its
    dispatcher, executor and slot processes are gone when it returns."""
    import psutil

    from falconet.benchmarks import hops

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    row = hops.floor_latency(n=50, warmup=5)
    assert row["tasks"] == 50 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
