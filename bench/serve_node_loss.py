"""A node holding a replica dies under load, on a multi-node `ray start` cluster on 127.0.0.1 (~2 min).

Every node is a `ray start` in a POSIX session of its own: a head of 0 CPUs (Serve's controller and the
proxy the clients use) and two worker nodes of 1 CPU, which hold the shipped config's 2 replicas of 1 CPU
(as in ``bench.serve_chaos``), one each. Under sustained load (client threads replaying DL19 queries,
every 200 checked against the model class in-process), one worker node's session is SIGKILLed at once:
its raylet, its replica and every other process on it. A third worker node is then started, as an
autoscaler would add one for the replica that has no room (the surviving node is full; ``--spare`` starts
it with the others instead: a cluster with room to spare), and the load runs until Serve has 2 running
replicas again (neither the dead one), then a few seconds more.

Each answer counts under the phase in which it arrived: ``before`` the kill, ``after_kill`` (until 2
replicas run again), ``recovered``; a request in flight at the kill counts after it. The shipped
``proxy_location: EveryNode`` starts a proxy on each worker node too. On one machine those would share the
clients' port (SO_REUSEPORT), and a client connected to the dying node's proxy loses its connection (a
load balancer's concern, not Serve's), so each worker's proxy binds a port of its own
(``RAY_SERVE_WORKER_PROXY_HTTP_PORT``) and the clients use the head's, as a load balancer would that has
dropped the dead node.

Prints JSON: status codes per phase (``timeout`` past 30 s; 503s with and without ``Retry-After``),
wrong scores, the max latency per phase, seconds from the kill to 2 running replicas, the proxy's
retries (from its log) and where the replicas ran.

    python -m bench.serve_node_loss [--model DIR] [--clients 6] [--before-s 10] [--after-s 5] [--spare]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.serve_chaos import PASSAGES, Cluster, Load, chaos_config, expected_scores, two_running, wait_until
from bench.serve_load import load_requests
from serve.__main__ import SHIPPED_RAY_SERVE_ENV
from serve.proxy import LOST_REPLICA_LOG
from tests.helpers import TWIN_MODEL
from tests.integration.processes import kill_session
from tests.serve_helpers import free_port

WORKER_CPUS = 1  # one replica of 1 CPU fits a worker node: the 2 replicas land on 2 nodes
RECOVERY_TIMEOUT_S = 240.0
PROXY_PORT_ENV = "RAY_SERVE_WORKER_PROXY_HTTP_PORT"  # a worker node's proxy binds this port, not the head's
NOT_RETRIED = "lost its try with no response; not retried: "  # serve/proxy.py's line, then its reason
REPLACEMENTS = {
    False: "a third worker node, started right after the kill (as an autoscaler would add one)",
    True: "a spare third worker node, started with the others (room for the replacement at once)",
}


def add_nodes(cluster: Cluster, count: int) -> list[int]:
    """``count`` worker nodes of ``WORKER_CPUS``, each proxy on a port of its own; their sessions.

    One after another: nodes started at once in one temp dir race for the same socket names.
    """
    proxy_ports = [free_port() for _ in range(count)]
    return [cluster.add_worker(WORKER_CPUS, {PROXY_PORT_ENV: str(port)}) for port in proxy_ports]


@dataclass(frozen=True)
class Placement:
    """The worker nodes (their sessions): two with a replica each, and the spare one (if started)."""

    victim: int
    survivor: int
    spare: int | None


def deploy_one_replica_per_node(cluster: Cluster, model: str, workdir: Path, spare: bool) -> Placement:
    """Two worker nodes (three with ``spare``), the shipped config deployed on them; where it runs.

    Raises:
        SystemExit: The deploy failed, or the replicas are not one per worker node.
    """
    nodes = add_nodes(cluster, 3 if spare else 2)
    deployed = cluster.serve("deploy", str(chaos_config(cluster, model, workdir)))
    if deployed.returncode != 0:
        raise SystemExit(deployed.stderr[-3000:])
    wait_until(lambda: two_running(cluster))
    placed = {node: len(cluster.replica_pids([node])) for node in nodes}
    holders = [node for node, count in placed.items() if count == 1]
    if len(holders) != 2 or sum(placed.values()) != 2:
        raise SystemExit(f"replicas per worker node: {list(placed.values())}, not one each")
    free = [node for node in nodes if node not in holders]
    return Placement(holders[0], holders[1], free[0] if free else None)


def lose_node(cluster: Cluster, load: Load, placement: Placement) -> dict[str, Any]:
    """SIGKILL the victim node's session under load; a new node unless there is a spare; time the recovery.

    ``recovery_s`` (from the kill) is ``None`` when 2 replicas did not run again within
    ``RECOVERY_TIMEOUT_S``; ``new_node`` is the session of the node with room for the replacement.
    """
    dead = set(cluster.replica_pids([placement.victim]))
    load.phase = "after_kill"
    killed = time.monotonic()
    report: dict[str, Any] = {"survivors_of_kill": len(kill_session(placement.victim))}
    report["new_node"] = placement.spare
    if placement.spare is None:
        report["new_node"] = add_nodes(cluster, 1)[0]
        report["new_node_up_s"] = round(time.monotonic() - killed, 2)
    try:
        wait_until(lambda: two_running(cluster, dead), timeout_s=RECOVERY_TIMEOUT_S)
        report["recovery_s"] = round(time.monotonic() - killed, 2)
    except SystemExit:
        report["recovery_s"] = None
    return report


def run_node_loss(
    cluster: Cluster,
    model: str,
    requests: list[tuple[str, list[str]]],
    expected: list[np.ndarray],
    load_s: tuple[int, float, float],
    spare: bool = False,
) -> dict[str, Any]:
    """Deploy on the worker nodes, load, lose one node, recover; the report's figures.

    The cluster's head must be started; the worker nodes are added here. ``load_s``: the clients, and the
    seconds of load before the kill and after the recovery.
    """
    clients, before_s, after_s = load_s
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        placement = deploy_one_replica_per_node(cluster, model, Path(workdir), spare)
    report: dict[str, Any] = {"replacement": REPLACEMENTS[spare]}
    report["nodes_up_and_deployed_s"] = round(time.monotonic() - started, 2)
    load = Load(cluster.http_port, requests, expected, by_arrival=True)
    load.phase = "before"
    with load.running(clients):
        time.sleep(before_s)
        loss = lose_node(cluster, load, placement)
        load.phase = "recovered"
        time.sleep(after_s)
    new = loss.pop("new_node")
    report.update(loss)
    report["replicas_per_node"] = {
        name: len(cluster.replica_pids([session]))
        for name, session in (("killed", placement.victim), ("surviving", placement.survivor), ("new", new))
    }
    report["codes"] = {phase: dict(codes) for phase, codes in load.codes.items()}
    report["wrong_scores"] = dict(load.wrong)
    report["max_latency_s"] = dict(load.max_latency_s)
    reasons = Counter(line.split(NOT_RETRIED)[1] for line in cluster.proxy_log_lines(NOT_RETRIED))
    report["proxy_retries"] = {  # serve/proxy.py's lines: tries that lost their replica
        "retried": cluster.proxy_log_count(f"{LOST_REPLICA_LOG} (try 1 of"),
        "lost_every_try": cluster.proxy_log_count("answering 503"),
        "not_retried": dict(reasons),  # by reason: the proxy's own answer stood
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TWIN_MODEL))
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--before-s", type=float, default=10.0, help="load before the kill")
    parser.add_argument("--after-s", type=float, default=5.0, help="load after 2 replicas run again")
    parser.add_argument("--spare", action="store_true", help="the third node up front, not after the kill")
    args = parser.parse_args()
    requests = [(q, p[:PASSAGES]) for q, p in load_requests()]
    expected = expected_scores(args.model, requests)
    cluster = Cluster(dict(SHIPPED_RAY_SERVE_ENV), num_cpus=0)
    started = time.monotonic()
    try:
        cluster.start()
        load_s = (args.clients, args.before_s, args.after_s)
        figures = run_node_loss(cluster, args.model, requests, expected, load_s, args.spare)
    finally:
        cluster.stop()
    report = {
        "model": args.model,
        "serve_env": SHIPPED_RAY_SERVE_ENV,
        "clients": args.clients,
        "nodes": f"head 0 CPUs; {3 if args.spare else 2} workers of {WORKER_CPUS} CPU; 2 replicas of 1 CPU",
        **figures,
        "bench_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
