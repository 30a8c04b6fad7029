"""Load test of the rerank service on 127.0.0.1, next to in-process scoring of the same requests.

Replays the DL19 queries, each with its 100 BM25 passages, as `/v1/rerank` requests at concurrency
1, 8 and 32 (a bounded number of requests per level), against each server variant in turn, and
prints JSON: p50/p99 latency, requests/s, pairs/s and error counts per level, and the in-process
time of the same requests (the model class, one request after another), measured again after each
variant: a variant's ratios are against the mean of the in-process runs just before and after it, as
this machine's speed drifts over a run of minutes. Variants:

- ``floor_uvicorn``: the same app and engine behind plain uvicorn, no Ray (``bench/plain_server.py``);
- ``noop_serve``: a Serve deployment that scores nothing (``bench/noop_app.py``): Serve's own cost;
- ``serve_defaults`` and one row per Serve option (``SERVE_OPTIONS``; ``access_log_off``), each alone
  on ``serve run configs/serve.yaml``;
- ``shipped``: ``python -m serve configs/serve.yaml``, as the README starts it.

    python -m bench.serve_load [--variants floor_uvicorn,noop_serve,shipped]   # with the twin
    python -m bench.serve_load --url http://127.0.0.1:8000 --model PATH         # a running server
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.proxy import PROXY_CALLBACK_ENV  # noqa: E402
from tests.helpers import DL19_TSV, TWIN_MODEL, read_trec_tsv  # noqa: E402
from tests.integration.processes import stop_cluster  # noqa: E402

LEVELS = (1, 8, 32)
SERVE_CLI = str(Path(sys.executable).with_name("serve"))
# Serve's request-path options, each measured alone on `serve run configs/serve.yaml` (set before Ray starts).
SERVE_OPTIONS: dict[str, dict[str, str]] = {
    "serve_defaults": {},
    "log_buffer": {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"},
    "direct_ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "throughput_optimized_haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
# Options only a launcher row takes (``launcher+NAME``): an empty value turns a shipped one off.
LAUNCHER_OPTIONS: dict[str, dict[str, str]] = {"no_proxy_retry": {PROXY_CALLBACK_ENV: ""}}
VARIANTS = ("floor_uvicorn", "noop_serve", *SERVE_OPTIONS, "access_log_off", "shipped")


def load_requests() -> list[tuple[str, list[str]]]:
    frame = read_trec_tsv(DL19_TSV)
    groups = frame.groupby("qid", sort=False)
    return [(group["query"].iloc[0], group["passage"].tolist()) for _, group in groups]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_in_process(scorer: Any, requests: list[tuple[str, list[str]]]) -> dict:
    """The model class in this process on the same requests, one after another: p50 and pairs/s."""
    scorer.score(["warm"] * 8, ["up"] * 8)
    latencies = []
    for query, passages in requests:
        started = time.perf_counter()
        scorer.score([query] * len(passages), passages)
        latencies.append(time.perf_counter() - started)
    pairs = sum(len(p) for _, p in requests)
    return {
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "pairs_per_s": round(pairs / sum(latencies), 1),
        "torch_threads": scorer.settings.torch_threads,
    }


def mean_baseline(before: dict, after: dict) -> dict:
    """The in-process figures measured just before and just after a variant, averaged (drift control)."""
    return {key: round((before[key] + after[key]) / 2, 2) for key in ("p50_ms", "pairs_per_s")}


def run_level(url: str, bodies: list[bytes], pairs_per_body: list[int], concurrency: int, total: int) -> dict:
    target = urlparse(url)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    counter = iter(range(total))
    lock = threading.Lock()
    scored_pairs = [0]

    def worker() -> None:
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            body = bodies[index % len(bodies)]
            started = time.perf_counter()
            connection.request("POST", "/v1/rerank", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                statuses[response.status] += 1
                if response.status == 200:
                    latencies.append(elapsed)
                    scored_pairs[0] += pairs_per_body[index % len(bodies)]
        connection.close()

    started = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": total,
        "p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(1000 * percentile(latencies, 0.99), 2) if latencies else None,
        "requests_per_s": round(len(latencies) / wall, 2),
        "pairs_per_s": round(scored_pairs[0] / wall, 1),
        "errors": {str(code): count for code, count in statuses.items() if code != 200},
    }


def start_server(
    model: str, url: str, env_vars: dict[str, str] | None = None, config: Path | str = "configs/serve.yaml"
) -> subprocess.Popen[bytes]:
    """`serve run CONFIG` (default: the shipped one) in its own process, as users run it; wait for /health."""
    return launch([SERVE_CLI, "run", str(config)], {"RERANK_MODEL": model, **(env_vars or {})}, url)


def launch(command: list[str], env_vars: dict[str, str], url: str) -> subprocess.Popen[bytes]:
    """Start a server in a session of its own (no RAY_SERVE_* but ``env_vars``); wait for /health."""
    target = urlparse(url)
    with contextlib.suppress(OSError), socket.create_connection((target.hostname, target.port), timeout=1):
        raise SystemExit(f"{url} already answers: stop that server first (it would be timed instead)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", "RERANK_", "RAY_ADDRESS"))}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", **env_vars)
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(1)
    stop(process)
    raise SystemExit(f"{' '.join(command)}: not healthy within 180 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C the server as a user would, then make sure nothing of its session is left."""
    process.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    stop_cluster(process.pid)


def variant_config(workdir: Path, name: str, changes: dict[str, Any]) -> Path:
    """configs/serve.yaml with ``changes`` merged into its application (e.g. a ``logging_config``)."""
    config = yaml.safe_load((ROOT / "configs/serve.yaml").read_text())
    config["applications"][0].update(changes)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def variant_command(name: str, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """How to start variant ``name``: its command line and the env vars it sets before Ray starts."""
    if name == "floor_uvicorn":
        return [sys.executable, "-m", "bench.plain_server"], {}
    if name == "noop_serve":
        return [SERVE_CLI, "run", "bench.noop_app:app"], {}
    if name == "shipped":  # as the README launches it: the launcher sets the shipped Serve options
        return [sys.executable, "-m", "serve", "configs/serve.yaml"], {}
    if name.startswith("launcher+"):  # the launcher with one more option set
        options = {**SERVE_OPTIONS, **LAUNCHER_OPTIONS}
        return [sys.executable, "-m", "serve", "configs/serve.yaml"], options[name.split("+", 1)[1]]
    if name == "access_log_off":
        config = variant_config(workdir, name, {"logging_config": {"enable_access_log": False}})
        return [SERVE_CLI, "run", str(config)], {}
    return [SERVE_CLI, "run", "configs/serve.yaml"], SERVE_OPTIONS[name]


def time_variant(
    name: str, model: str, workdir: Path, bodies: list[bytes], sizes: list[int], rounds: int
) -> dict:
    """Start one variant, warm it, run every concurrency level against it, stop it."""
    url = "http://127.0.0.1:8000"  # the port of configs/serve.yaml and of the floor
    command, env_vars = variant_command(name, workdir)
    started = time.perf_counter()
    server = launch(command, {"RERANK_MODEL": model, **env_vars}, url)
    healthy_s = time.perf_counter() - started
    try:
        run_level(url, bodies[:4], sizes[:4], 1, 4)  # warm the path
        levels = [run_level(url, bodies, sizes, c, rounds * len(bodies)) for c in LEVELS]
    finally:
        stop(server)
    return {"healthy_after_s": round(healthy_s, 1), "env": env_vars, "levels": levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="load a running server instead of starting the variants")
    parser.add_argument("--model", default=str(TWIN_MODEL))
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="in-process torch threads (the server's follow its num_cpus)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="passes over the 43 DL19 queries per level")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS)
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    requests = load_requests()
    from reranker.model import CrossEncoderModel

    scorer = CrossEncoderModel(args.model, torch_threads=args.threads)
    in_process = time_in_process(scorer, requests)
    bodies = [json.dumps({"query": q, "documents": p, "top_n": 10}).encode() for q, p in requests]
    sizes = [len(p) for _, p in requests]
    if args.url:
        run_level(args.url, bodies[:4], sizes[:4], 1, 4)
        results = {
            "url": {
                "levels": [run_level(args.url, bodies, sizes, c, args.rounds * len(bodies)) for c in LEVELS]
            }
        }
        results["url"].update(versus_in_process(results["url"]["levels"], in_process))
    else:
        results = {}
        before = in_process
        with tempfile.TemporaryDirectory() as workdir:
            for name in args.variants.split(","):
                result = time_variant(name, args.model, Path(workdir), bodies, sizes, args.rounds)
                after = time_in_process(scorer, requests)  # the machine drifts over a run of minutes
                result["in_process_around"] = mean_baseline(before, after)
                result.update(versus_in_process(result["levels"], result["in_process_around"]))
                results[name], before = result, after
    report = {
        "model": args.model,
        "cpus": os.cpu_count(),
        "requests_per_level": args.rounds * len(bodies),
        "passages_per_request": statistics.mean(sizes),
        "in_process": in_process,
        "variants": results,
    }
    print(json.dumps(report, indent=2))


def versus_in_process(levels: list[dict], in_process: dict) -> dict[str, float | None]:
    """The two goals' ratios: c=1 p50 latency and c=8 pairs/s, each over the model class in-process.

    For a started variant the in-process figures are the mean of the runs just before and after it.
    """
    by_level = {level["concurrency"]: level for level in levels}
    c1, c8 = by_level[1]["p50_ms"], by_level[8]["pairs_per_s"]
    return {
        "c1_p50_latency_vs_in_process": round(c1 / in_process["p50_ms"], 3) if c1 else None,
        "c8_pairs_per_s_vs_in_process": round(c8 / in_process["pairs_per_s"], 3),
    }


if __name__ == "__main__":
    main()
