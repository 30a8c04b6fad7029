"""The service under faults, on a `ray start --head` cluster on 127.0.0.1 (bounded; a few minutes).

With 2 replicas of the shipped config under sustained load (client threads replaying DL19 queries with
20 passages each; every 200 checked against the model class in-process):

1. ``kill``: SIGKILL one replica; time until Serve has 2 running replicas again.
2. ``user_config``: ``serve deploy`` of a new ``user_config`` (applied in place).
3. ``restart``: ``serve deploy`` of a new model setting (``torch_threads``): replicas are replaced.
4. ``disconnect`` (load stopped): clients send heavy requests and hang up; then one probe request.
   If abandoned requests kept their queue slots, the probe would wait for all of their work.

The shipped env loads ``serve/proxy.py``'s middleware into the proxy, which retries a request whose
replica died; ``proxy_retries`` counts the tries it saw lost (from the proxy's log).

Prints JSON: status codes seen per phase (a timeout counts as ``timeout``; 503s with and without
``Retry-After``), wrong scores, the recovery and deploy times, and the probe's latency.

    python -m bench.serve_chaos [--model DIR] [--clients 6] [--serve-env shipped|serve_defaults|...]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.serve_load import SERVE_OPTIONS, load_requests
from serve.__main__ import SHIPPED_RAY_SERVE_ENV
from serve.proxy import LOST_REPLICA_LOG
from tests.helpers import REPO_ROOT, TWIN_MODEL
from tests.integration.processes import stop_cluster, titled
from tests.serve_helpers import free_port

BIN = Path(sys.executable).parent
PASSAGES = 20
REQUEST_TIMEOUT_S = 30.0


def ray_start(args: list[str], env: dict[str, str]) -> int:
    """``ray start ARGS`` in a POSIX session of its own; that session's id.

    The daemons it leaves behind stay in the session, so killing the session's processes takes down
    exactly that node (see :func:`tests.integration.processes.stop_cluster`).
    """
    command = [
        str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}", *args,
    ]  # fmt: skip
    starter = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = starter.communicate(timeout=180)
    except BaseException:
        stop_cluster(starter.pid)
        raise
    if starter.returncode != 0:
        stop_cluster(starter.pid)
        raise SystemExit(output[-3000:])
    return starter.pid


@dataclass
class Cluster:
    """A `ray start --head` cluster on 127.0.0.1 in its own session and temp dir, with token auth.

    ``add_worker`` adds a node, each in a session of its own (``workers``): killing that session's
    processes is that node's loss.
    """

    serve_env: dict[str, str]
    num_cpus: int = 2
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rrx-", dir="/tmp"))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    session: int = 0
    workers: list[int] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The clients' environment (and the cluster's, which adds the Serve options)."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RERANK_", "RAY_SERVE_"))
        }
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))  # this checkout's code
        return {
            **env, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": path,
        }  # fmt: skip

    def start(self) -> None:
        """`ray start --head` with the Serve options in its env (they must be set before Ray starts)."""
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env, capture_output=True)
        head = [
            "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
        ]  # fmt: skip
        self.session = ray_start(head, {**self.env, **self.serve_env})

    def add_worker(self, num_cpus: int, env: dict[str, str] | None = None) -> int:
        """Start a worker node with ``num_cpus`` (the Serve options and ``env`` in its env); its session.

        It shares the head's temp dir (Ray gives every node the head's), so its logs are found there too.
        """
        args = [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}"]
        self.workers.append(ray_start(args, {**self.env, **self.serve_env, **(env or {})}))
        return self.workers[-1]

    def stop(self) -> None:
        """Kill exactly this cluster's processes (``ray stop`` would kill any other Ray here too)."""
        for session in self.workers:
            stop_cluster(session)
        if self.session:
            stop_cluster(self.session)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def serve(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``serve ARGS --address`` against the cluster."""
        address = f"http://127.0.0.1:{self.dashboard_port}"
        return subprocess.run(
            [str(BIN / "serve"), *args, "--address", address],
            env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def replicas(self) -> dict[str, Any]:
        """The Reranker deployment's status and replica states, from ``serve status``."""
        status = yaml.safe_load(self.serve("status").stdout or "{}") or {}
        app = (status.get("applications") or {}).get("rerank") or {}
        deployment = (app.get("deployments") or {}).get("Reranker") or {}
        return {"app": app.get("status"), "states": deployment.get("replica_states") or {}}

    def proxy_log_lines(self, text: str) -> list[str]:
        """Lines of the proxies' logs (every node's) that contain ``text``."""
        pattern = "session_*/logs/serve/proxy_*.log"  # session_latest links to the session: each file once
        logs = {path.resolve() for path in Path(self.temp_dir).glob(pattern)}
        lines = (line for path in logs for line in path.read_text(errors="replace").splitlines())
        return [line for line in lines if text in line]

    def proxy_log_count(self, text: str) -> int:
        """Lines of the proxies' logs (every node's) that contain ``text``."""
        return len(self.proxy_log_lines(text))

    def replica_pids(self, sessions: Iterable[int] | None = None) -> list[int]:
        """The processes of the Reranker's replicas, on every node or on those of ``sessions``."""
        chosen = [self.session, *self.workers] if sessions is None else sessions
        return [pid for session in chosen for pid in titled(session, "ServeReplica:rerank:Reranker")]


def chaos_config(cluster: Cluster, model: str, workdir: Path, **changes: Any) -> Path:
    """configs/serve.yaml on this port with 2 fixed replicas of 1 CPU, ``changes`` in its args.

    A ``user_config=`` change goes to the deployment's user_config instead.
    """
    config = yaml.safe_load((REPO_ROOT / "configs/serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": cluster.http_port}
    application = config["applications"][0]
    deployment = application["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment["num_replicas"] = 2
    deployment["ray_actor_options"]["num_cpus"] = 1
    deployment["user_config"].update(changes.pop("user_config", {}))
    application["args"].update(model=model, **changes)  # `serve deploy` does not carry the client's env
    path = workdir / f"serve-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_until(check: Any, timeout_s: float = 180, every_s: float = 0.5) -> float:
    """Poll ``check()`` until true; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if check():
            return round(time.monotonic() - started, 2)
        time.sleep(every_s)
    raise SystemExit(f"not reached within {timeout_s} s")


def two_running(cluster: Cluster, old_pids: AbstractSet[int] = frozenset()) -> bool:
    """Serve runs 2 replicas again (2 processes, both RUNNING), none of them one of ``old_pids``."""
    pids = set(cluster.replica_pids())  # first: `serve status` lags a killed replica's death
    if len(pids) != 2 or pids & old_pids:
        return False
    status = cluster.replicas()
    return status["app"] == "RUNNING" and status["states"] == {"RUNNING": 2}


class Load:
    """Client threads posting /v1/rerank until stopped; each answer recorded under a phase.

    The phase is the one current when the request was sent, or with ``by_arrival`` when its answer came
    (so a request in flight at a fault counts after it).
    """

    def __init__(
        self,
        port: int,
        requests: list[tuple[str, list[str]]],
        expected: list[np.ndarray],
        by_arrival: bool = False,
    ) -> None:
        self.port, self.requests, self.expected, self.by_arrival = port, requests, expected, by_arrival
        self.phase = "warm"
        self.codes: dict[str, Counter[str]] = {}
        self.wrong: Counter[str] = Counter()
        self.max_latency_s: dict[str, float] = {}
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def worker(self, offset: int) -> None:
        """Post requests one after another until stopped."""
        for number in range(offset, 10**9):
            if self.stopped.is_set():
                return
            index = number % len(self.requests)
            phase, started = self.phase, time.monotonic()
            code, scores = self.post(index)
            latency_s, phase = time.monotonic() - started, self.phase if self.by_arrival else phase
            wrong = scores is not None and not np.allclose(scores, self.expected[index], atol=1e-4)
            with self.lock:
                self.codes.setdefault(phase, Counter())[code] += 1
                self.wrong[phase] += int(wrong)
                self.max_latency_s[phase] = max(self.max_latency_s.get(phase, 0.0), round(latency_s, 3))

    def post(self, index: int) -> tuple[str, np.ndarray | None]:
        """One request; its status (``503+retry_after`` / ``503-no_retry_after``, ``timeout``) and scores."""
        query, passages = self.requests[index]
        body = json.dumps({"query": query, "documents": passages}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            connection.request("POST", "/v1/rerank", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
        except TimeoutError:
            return "timeout", None
        except (OSError, http.client.HTTPException) as exc:
            return f"connection:{type(exc).__name__}", None
        finally:
            connection.close()
        if response.status == 503:
            return "503" + ("+retry_after" if response.getheader("Retry-After") else "-no_retry_after"), None
        if response.status != 200:
            return str(response.status), None
        results = sorted(json.loads(payload)["results"], key=lambda result: result["index"])
        return "200", np.array([result["relevance_score"] for result in results])

    @contextlib.contextmanager
    def running(self, clients: int) -> Iterator[Load]:
        """Run ``clients`` threads for the duration of the block."""
        threads = [threading.Thread(target=self.worker, args=(n * 7,), daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self.stopped.set()
            for thread in threads:
                thread.join(timeout=REQUEST_TIMEOUT_S + 5)


def expected_scores(model: str, requests: list[tuple[str, list[str]]]) -> list[np.ndarray]:
    """/v1/rerank's relevance scores per request, from the model class in-process."""
    from reranker.model import CrossEncoderModel, sigmoid

    scorer = CrossEncoderModel(model)
    return [sigmoid(scorer.score([q] * len(p), p).scores) for q, p in requests]


def abandon_requests(
    port: int, count: int, documents: list[str], hang_up_after_s: float
) -> tuple[int, float]:
    """Send ``count`` heavy requests, hang up on each; then time one probe request to a 200."""
    body = json.dumps({"query": "what is abandoned", "documents": documents}).encode()
    sockets = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port))
        head = f"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
        client.sendall(head.encode() + b"\r\nContent-Type: application/json\r\n\r\n" + body)
        sockets.append(client)
    time.sleep(hang_up_after_s)
    for client in sockets:
        client.close()
    time.sleep(1.0)
    probe = json.dumps({"query": "probe", "documents": documents[:20]}).encode()
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/rerank", probe, {"Content-Type": "application/json"})
    status = connection.getresponse().status
    return status, round(time.monotonic() - started, 2)


def run_phases(cluster: Cluster, model: str, workdir: Path, clients: int) -> dict[str, Any]:
    """Deploy, load, and run the fault phases; returns the report's phase figures."""
    requests = [(q, p[:PASSAGES]) for q, p in load_requests()]
    deployed = cluster.serve("deploy", str(chaos_config(cluster, model, workdir)))
    if deployed.returncode != 0:
        raise SystemExit(deployed.stderr[-3000:])
    report: dict[str, Any] = {"first_deploy_s": wait_until(lambda: two_running(cluster))}
    load = Load(cluster.http_port, requests, expected_scores(model, requests))
    with load.running(clients):
        time.sleep(5)
        load.phase = "kill"
        victim = cluster.replica_pids()[0]
        os.kill(victim, 9)
        report["kill_recovery_s"] = wait_until(lambda: two_running(cluster, {victim}))
        time.sleep(3)
        load.phase = "user_config"
        started = time.monotonic()
        cluster.serve(
            "deploy", str(chaos_config(cluster, model, workdir, user_config={"max_batch_pairs": 128}))
        )
        time.sleep(1)
        wait_until(lambda: two_running(cluster))
        report["user_config_deploy_s"] = round(time.monotonic() - started, 2)
        time.sleep(3)
        load.phase = "restart"
        old = set(cluster.replica_pids())
        started = time.monotonic()
        cluster.serve("deploy", str(chaos_config(cluster, model, workdir, torch_threads=1)))
        wait_until(lambda: two_running(cluster, old))
        report["restart_deploy_s"] = round(time.monotonic() - started, 2)
        time.sleep(3)
        load.phase = "after"
        time.sleep(3)
    report["codes"] = {phase: dict(codes) for phase, codes in load.codes.items()}
    report["wrong_scores"] = dict(load.wrong)
    documents = [passage for _, passages in load_requests() for passage in passages][:1000]
    status, probe_s = abandon_requests(cluster.http_port, 48, documents, hang_up_after_s=0.5)
    report["disconnect"] = {
        "abandoned": 48,
        "documents_each": len(documents),
        "probe_status": status,
        "probe_s": probe_s,
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TWIN_MODEL))
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument(
        "--serve-env", default="shipped", help="shipped, or a name in bench.serve_load.SERVE_OPTIONS"
    )
    args = parser.parse_args()
    serve_env = SHIPPED_RAY_SERVE_ENV if args.serve_env == "shipped" else SERVE_OPTIONS[args.serve_env]
    cluster = Cluster(dict(serve_env))
    started = time.monotonic()
    try:
        cluster.start()
        with tempfile.TemporaryDirectory() as workdir:
            phases = run_phases(cluster, args.model, Path(workdir), args.clients)
        phases["proxy_retries"] = {  # serve/proxy.py's lines: tries that lost their replica
            "retried": cluster.proxy_log_count(f"{LOST_REPLICA_LOG} (try 1 of"),
            "lost_every_try": cluster.proxy_log_count("answering 503"),
        }
    finally:
        cluster.stop()
    report = {"model": args.model, "serve_env": serve_env, "clients": args.clients, **phases}
    report["bench_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
