"""Load test of the rerank service on 127.0.0.1, next to in-process scoring of the same requests.

Replays the DL19 queries, each with its 100 BM25 passages, as `/v1/rerank` requests at concurrency
1, 8 and 32 (a bounded number of requests per level), and prints JSON: p50/p99 latency,
requests/s, pairs/s and error counts per level, and the in-process time of the same requests.

    python bench/serve_load.py                      # runs `serve run configs/serve.yaml` with the twin
    python bench/serve_load.py --url http://127.0.0.1:8000 --model PATH   # an already running server
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import DL19_TSV, TWIN_MODEL, read_trec_tsv  # noqa: E402

LEVELS = (1, 8, 32)


def load_requests() -> list[tuple[str, list[str]]]:
    frame = read_trec_tsv(DL19_TSV)
    groups = frame.groupby("qid", sort=False)
    return [(group["query"].iloc[0], group["passage"].tolist()) for _, group in groups]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_in_process(model: str, requests: list[tuple[str, list[str]]], threads: int) -> dict:
    from reranker.model import CrossEncoderModel

    scorer = CrossEncoderModel(model, torch_threads=threads)
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
        "torch_threads": threads,
    }


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
    env = {**os.environ, "RERANK_MODEL": model, **(env_vars or {})}
    serve_cli = str(Path(sys.executable).with_name("serve"))
    process = subprocess.Popen(
        [serve_cli, "run", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = urlparse(url)
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
    process.terminate()
    raise SystemExit("the server did not become healthy within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--model", default=str(TWIN_MODEL))
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="in-process torch threads (the server's follow its num_cpus)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="passes over the 43 DL19 queries per level")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    requests = load_requests()
    in_process = time_in_process(args.model, requests, args.threads)
    url = args.url or "http://127.0.0.1:8000"  # the port in configs/serve.yaml
    server = None if args.url else start_server(args.model, url)
    bodies = [json.dumps({"query": q, "documents": p, "top_n": 10}).encode() for q, p in requests]
    sizes = [len(p) for _, p in requests]
    run_level(url, bodies[:4], sizes[:4], 1, 4)  # warm the path
    try:
        levels = [run_level(url, bodies, sizes, c, args.rounds * len(bodies)) for c in LEVELS]
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
    by_level = {level["concurrency"]: level for level in levels}
    report = {
        "model": args.model,
        "cpus": os.cpu_count(),
        "requests_per_level": args.rounds * len(bodies),
        "passages_per_request": statistics.mean(sizes),
        "in_process": in_process,
        "levels": levels,
        "c1_p50_latency_vs_in_process": round(by_level[1]["p50_ms"] / in_process["p50_ms"], 3),
        "c8_pairs_per_s_vs_in_process": round(by_level[8]["pairs_per_s"] / in_process["pairs_per_s"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
