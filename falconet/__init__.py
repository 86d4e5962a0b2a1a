"""falconet: a fast, light-weight pilot-job task farm.

    import falconet
    with falconet.local(slots=2) as client:
        print(client.submit(pow, 2, 10).result())
"""

from falconet.client import Client, FalconetExecutor, FuturesExecutor, TaskFuture
from falconet.elastic import ElasticCluster, provision
from falconet.errors import (
    AddressError,
    DispatcherUnavailable,
    FalconetError,
    ProtocolError,
    RefusedError,
    TaskError,
)
from falconet.local import LocalCluster, local
from falconet.tasks import CommandResult

__version__ = "0.1.0"

__all__ = [
    "AddressError", "Client", "CommandResult", "DispatcherUnavailable", "ElasticCluster", "FalconetError",
    "FalconetExecutor", "FuturesExecutor", "LocalCluster", "ProtocolError", "RefusedError", "TaskError", "TaskFuture",
    "local", "provision",
]
