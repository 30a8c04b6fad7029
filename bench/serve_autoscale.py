"""Autoscaling you can watch: replicas go 1 -> 2 under sustained load and back to 1 after it.

Deploys the shipped `configs/serve.yaml` with `serve run` (as users run it), changed only to fit a
2-core machine: 1-CPU replicas, `min_replicas: 1`, `max_replicas: 2`, short delays. Applies
concurrent 100-passage DL19 requests for `--load-s` seconds, polls `serve status` every second, and
prints JSON: the replica count over time and every status code seen.

    python bench/serve_autoscale.py [--model DIR] [--load-s 45] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import DL19_TSV, TWIN_MODEL, read_trec_tsv  # noqa: E402

BIN = Path(sys.executable).parent
URL = "http://127.0.0.1:8000"  # the port in configs/serve.yaml
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "metrics_interval_s": 1,
    "look_back_period_s": 3,
    "upscale_delay_s": 3,
    "downscale_delay_s": 8,
}


def autoscale_config(model: str) -> dict:
    """configs/serve.yaml with 1-CPU replicas and short autoscaling delays."""
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    application = config["applications"][0]
    application["args"]["model"] = model  # `serve run` passes no client env to replicas: args carry it
    deployment = application["deployments"][0]
    deployment["ray_actor_options"]["num_cpus"] = 1
    deployment["autoscaling_config"] = AUTOSCALING
    return config


def replica_count(env: dict[str, str]) -> int | None:
    """RUNNING replicas of the Reranker deployment, from `serve status`."""
    answer = subprocess.run(
        [str(BIN / "serve"), "status"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    try:
        status = yaml.safe_load(answer.stdout)
        states = status["applications"]["rerank"]["deployments"]["Reranker"]["replica_states"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None
    return int(states.get("RUNNING", 0))


def wait_healthy(deadline_s: float = 180) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if requests.get(URL + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit("the server did not become healthy within 180 s")


def load(bodies: list[dict], stop: threading.Event, statuses: collections.Counter) -> None:
    """One client: send requests back to back until told to stop; count every status code."""
    session = requests.Session()
    index = 0
    while not stop.is_set():
        try:
            response = session.post(URL + "/v1/rerank", json=bodies[index % len(bodies)], timeout=60)
            statuses[str(response.status_code)] += 1
        except requests.RequestException as exc:
            statuses[type(exc).__name__] += 1
        index += 1


def watch(env: dict[str, str], started: float, phase: str, samples: list[dict]) -> int | None:
    count = replica_count(env)
    samples.append({"t_s": round(time.monotonic() - started, 1), "phase": phase, "replicas": count})
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TWIN_MODEL))
    parser.add_argument("--load-s", type=float, default=45)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--settle-s", type=float, default=90, help="longest wait for the scale-down")
    args = parser.parse_args()
    frame = read_trec_tsv(DL19_TSV)
    bodies = [
        {"query": query, "documents": group["passage"].tolist(), "top_n": 10}
        for query, group in frame.groupby("query", sort=False)
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1"}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(autoscale_config(args.model), handle)
    server = subprocess.Popen(
        [str(BIN / "serve"), "run", handle.name],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples: list[dict] = []
    statuses: collections.Counter = collections.Counter()
    try:
        wait_healthy()
        started = time.monotonic()
        watch(env, started, "idle", samples)
        stop = threading.Event()
        clients = [
            threading.Thread(target=load, args=(bodies, stop, statuses)) for _ in range(args.concurrency)
        ]
        for client in clients:
            client.start()
        while time.monotonic() - started < args.load_s:
            watch(env, started, "load", samples)
            time.sleep(1)
        stop.set()
        for client in clients:
            client.join()
        settle_until = time.monotonic() + args.settle_s
        while time.monotonic() < settle_until:
            if watch(env, started, "after", samples) == 1 and any(s["replicas"] == 2 for s in samples):
                break
            time.sleep(1)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        os.unlink(handle.name)
    under_load = [s["replicas"] for s in samples if s["phase"] == "load"]
    after = [s["replicas"] for s in samples if s["phase"] == "after"]
    report = {
        "model": args.model,
        "concurrency": args.concurrency,
        "autoscaling_config": AUTOSCALING,
        "status_codes": dict(statuses),
        "max_replicas_under_load": max((n for n in under_load if n is not None), default=None),
        "replicas_at_end": after[-1] if after else None,
        "scaled_1_2_1": samples[0]["replicas"] == 1 and 2 in under_load and bool(after) and after[-1] == 1,
        "timeline": [f"{s['t_s']}s {s['phase']} {s['replicas']}" for s in samples],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
