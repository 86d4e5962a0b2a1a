"""The client side of test_dhcp.py, run inside the server's network namespace.

    python dhcp_client.py CLIENT_ADDRESS EXECUTOR_ID[,EXECUTOR_ID...] N_TASKS TIMEOUT_S

Waits until exactly those executors are registered, runs N_TASKS commands that print the
global IPv4 addresses of wherever they run, and prints one JSON object: the dispatcher's
executor rows (id, addresses) and each task's executor, exit code and output.  Exits 1,
still printing what it saw, when the executors do not all register in time.
"""

from __future__ import annotations

import json
import sys
import time

import falconet

# The sleep keeps one executor from finishing every task before the other asks for one.
COMMAND = "sleep 0.05; ip -4 -o addr show scope global"


def main(address: str, executor_ids: set[str], n_tasks: int, timeout_s: float) -> int:
    """Wait for the executors, run the commands, print the JSON report."""
    deadline = time.monotonic() + timeout_s
    with falconet.Client(address, name="dhcp-test", connect_timeout_s=timeout_s) as client:
        rows = client.status(detail=True)["executor_table"]
        while {r["id"] for r in rows} != executor_ids:
            if time.monotonic() > deadline:
                print(json.dumps({"error": f"executors {sorted(executor_ids)} not all registered "
                                           f"after {timeout_s:g}s", "executor_table": rows}, default=str))
                return 1
            time.sleep(0.05)
            rows = client.status(detail=True)["executor_table"]
        futures = client.submit_commands([COMMAND] * n_tasks)
        results = [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures]
    print(json.dumps({
        "executor_table": [{"id": r["id"], "addresses": r["addresses"]} for r in rows],
        "tasks": [{"executor": r.executor, "exit_code": r.exit_code, "stdout": r.stdout} for r in results],
    }))
    return 0


if __name__ == "__main__":
    address, ids, n, timeout = sys.argv[1:]
    sys.exit(main(address, set(ids.split(",")), int(n), float(timeout)))
