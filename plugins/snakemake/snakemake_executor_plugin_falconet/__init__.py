"""Snakemake executor plugin for falconet: ``snakemake --executor falconet --jobs N``.

With ``--falconet-dispatcher tcp://HOST:PORT`` (or ``$FALCONET_DISPATCHER``) the jobs go to
that dispatcher's executors, which must share the workflow's file system; with neither, an
embedded local cluster (``--falconet-slots``, default one per CPU) is started for the run
and stopped at its end.
"""

from dataclasses import dataclass, field

from snakemake_interface_executor_plugins.settings import CommonSettings, ExecutorSettingsBase

from snakemake_executor_plugin_falconet.executor import Executor

__all__ = ["Executor", "ExecutorSettings", "common_settings"]


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    """``--falconet-*`` options (also ``SNAKEMAKE_FALCONET_*`` environment variables)."""

    # Each field names its "type": Snakemake makes argparse types from the fields and
    # understands Optional[X] but not X | None (nor postponed annotations).

    dispatcher: str | None = field(default=None, metadata={
        "help": "The dispatcher's client address, tcp://HOST:PORT [default: $FALCONET_DISPATCHER; "
                "without either, an embedded local cluster runs the jobs].",
        "env_var": True, "metavar": "ADDR", "required": False, "type": str})
    dispatcher_key: str | None = field(default=None, metadata={
        "help": "The dispatcher's public key (file or text), for a dispatcher started with --keys "
                "[default: $FALCONET_DISPATCHER_KEY].",
        "env_var": True, "metavar": "FILE|KEY", "required": False, "type": str})
    key: str | None = field(default=None, metadata={
        "help": "This client's secret key file [default: $FALCONET_KEY].",
        "env_var": True, "metavar": "FILE", "required": False, "type": str})
    slots: int | None = field(default=None, metadata={
        "help": "Slots (and cpus) of the embedded local cluster, used when no dispatcher is given "
                "[default: the number of CPUs].",
        "env_var": True, "metavar": "N", "required": False, "type": int})


common_settings = CommonSettings(
    non_local_exec=True,  # jobs run elsewhere, as `snakemake --target-jobs` lines
    implies_no_shared_fs=False,  # executors share the workflow's file system
    job_deploy_sources=False,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    pass_envvar_declarations_to_cmd=True,  # --envvars reach the job in its command line
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=0,  # status comes from futures: no reason to wait
    pass_group_args=True,
)
