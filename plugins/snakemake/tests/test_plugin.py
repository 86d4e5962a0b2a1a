"""Snakemake's own generic executor tests (snakemake.common.tests), the ones the Slurm and
Kubernetes plugins subclass, run through falconet: once on an embedded cluster (no
dispatcher given) and once on a dispatcher the test started."""

from __future__ import annotations

import pytest
import snakemake.common.tests
from snakemake_executor_plugin_falconet import ExecutorSettings

import falconet


class TestWorkflowsEmbedded(snakemake.common.tests.TestWorkflowsLocalStorageBase):
    """No dispatcher: the plugin starts and stops a local cluster for each workflow."""

    __test__ = True

    def get_executor(self) -> str:
        return "falconet"

    def get_executor_settings(self) -> ExecutorSettings:
        return ExecutorSettings(slots=2)


class TestWorkflowsDispatcher(snakemake.common.tests.TestWorkflowsLocalStorageBase):
    """--falconet-dispatcher: the jobs go to a dispatcher that outlives the workflow."""

    __test__ = True

    @pytest.fixture(autouse=True)
    def _dispatcher(self, falconet_cluster: falconet.LocalCluster) -> None:
        self.address = falconet_cluster.client_address

    def get_executor(self) -> str:
        return "falconet"

    def get_executor_settings(self) -> ExecutorSettings:
        return ExecutorSettings(dispatcher=self.address)
