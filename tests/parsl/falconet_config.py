"""Parsl's test suite on falconet: `pytest PARSL/tests --config tests/parsl/falconet_config.py`.

The contract of Parsl's own test configs (parsl/tests/configs/local_threads.py): a module
with fresh_config() returning a Config, and config.  The executor starts an embedded
falconet cluster (a dispatcher and one executor of 4 slots) when Parsl loads the config.
"""

from parsl.config import Config

from falconet.parsl import FalconetExecutor


def fresh_config() -> Config:
    return Config(executors=[FalconetExecutor(label="falconet", slots=4)])


config = fresh_config()
