"""Crash points for fault tests: FALCONET_FAILPOINTS=name[,name] kills this process there.

A test that must show what survives a crash at an exact step (say, between a cloud launch
call and the provisioner noting it) names the step; without the variable this costs one
set lookup.
"""

from __future__ import annotations

import os
import signal

_ARMED = frozenset(filter(None, os.environ.get("FALCONET_FAILPOINTS", "").split(",")))


def hit(name: str) -> None:
    """Die by SIGKILL here when the failpoint `name` is armed."""
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
