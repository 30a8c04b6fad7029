# Ray's stubs of ray._raylet and its generated protobuf modules lack the names used here.
# mypy: disable-error-code="attr-defined"
"""Ask a Ray cluster's GCS about its nodes, or drain one, from a process of its own.

    python -m tests.integration.gcs ADDRESS nodes
    python -m tests.integration.gcs ADDRESS drain NODE_ID DEADLINE_MS

Prints one JSON document. Tests run this with the cluster's client environment (``RAY_AUTH_MODE=token``)
rather than open a GCS client in the test process: Ray caches its auth mode and token per process
(RayConfig, a token-loader singleton), and the test process may hold a Ray of its own without them.
``drain`` is the call Ray's autoscaler makes when a cloud sends a preemption notice (``ray drain-node``
makes the same one).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def nodes(address: str) -> dict[str, dict[str, Any]]:
    """Every node the GCS knows, by hex id: alive, head, its drain deadline (Unix ms; None: not draining,
    0: no deadline) and, once dead, why."""
    from ray._private.services import _get_gcs_client_options
    from ray._private.state import GlobalState
    from ray._raylet import GcsClient
    from ray.core.generated import common_pb2, gcs_pb2

    state = GlobalState()
    state._initialize_global_state(_get_gcs_client_options(address))
    draining = state.get_draining_nodes()
    found = {}
    for node_id, info in GcsClient(address=address).get_all_node_info(timeout=30).items():
        found[node_id.hex()] = {
            "alive": info.state == gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE,
            "head": info.is_head_node,
            "draining_deadline_ms": draining.get(node_id.hex()),
            "death_reason": common_pb2.NodeDeathInfo.Reason.Name(info.death_info.reason),
            "death_message": info.death_info.reason_message,
        }
    return found


def drain(address: str, node_id: str, deadline_ms: int) -> dict[str, Any]:
    """Drain a node for preemption, to be gone at ``deadline_ms`` (Unix ms); whether the GCS accepted."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, rejection = GcsClient(address=address).drain_node(
        node_id, reason, "preempted: the cloud takes this machine back", deadline_ms
    )
    return {"accepted": bool(accepted), "rejection": rejection}


def main(argv: Sequence[str]) -> None:
    """Run one command (see the module's docstring) and print its JSON."""
    address, command, *args = argv
    if command == "nodes":
        print(json.dumps(nodes(address)))
    elif command == "drain":
        print(json.dumps(drain(address, args[0], int(args[1]))))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
