"""benchmarks/: the parts that must follow the code they measure."""

from __future__ import annotations

from falconet.benchmarks import dispatch


def test_the_dispatch_bench_speaks_this_protocol():
    """Its helpers encode frames by hand (no falconet import in their processes): a protocol
    change must update them, or `falconet bench` fails at start."""
    dispatch._check_protocol()
