"""Cold start and idle footprint of both halves, as a user launches them on this machine.

- **service**: launch (``serve run configs/serve.yaml`` as shipped, or the ``python -m serve`` launcher)
  to the first 200 of a ``/v1/rerank`` request; then, after ``--idle-s`` seconds of no traffic, the
  summed RSS and PSS of every process the launch made, and its split by Ray's process titles.
- **job**: ``python -m jobs.rescore`` on a small input (embedded Ray) to its summary line, with its
  peak memory.

Milestones come from the launch's own log (Ray up, Serve up, app built, replica ready). Prints one
JSON object.

    python -m bench.cold_start [--model DIR] [--launchers serve_run,launcher] [--idle-s 10]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import ROOT, pss_kib, rss_kib, run_job, write_pairs
from bench.serve_load import SERVE_CLI
from tests.helpers import TWIN_MODEL
from tests.integration.processes import session_pids, stop_cluster

LAUNCHERS = {
    "serve_run": [SERVE_CLI, "run", "configs/serve.yaml"],
    "launcher": [sys.executable, "-m", "serve", "configs/serve.yaml"],
}
# Log lines that mark where a service's start-up seconds go, in the order they happen.
MILESTONES = {
    "ray_started": "Started a local Ray instance",
    "serve_started": "Started Serve in namespace",
    "app_import_started": "Importing application",
    "app_built": "Imported and built app",
    "replica_added": "Adding 1 replica",
    "replica_ready": "Reranker ready",
}
TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
BODY = json.dumps({"query": "what is a cross-encoder", "documents": ["a reranker", "a fish"]}).encode()


def first_answer(port: int, deadline_s: float) -> float:
    """Poll ``POST /v1/rerank`` until a 200; the monotonic time it came."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("POST", "/v1/rerank", BODY, {"Content-Type": "application/json"})
            if connection.getresponse().status == 200:
                return time.monotonic()
        time.sleep(0.2)
    raise SystemExit(f"no 200 within {deadline_s} s")


def footprint(session_id: int) -> dict[str, Any]:
    """Summed RSS / PSS (MiB) of a session's processes, and each title's share, biggest first."""
    by_title: dict[str, float] = defaultdict(float)
    rss = pss = 0
    pids = session_pids(session_id)
    for pid in pids:
        rss_pid, pss = rss_kib(pid), pss + pss_kib(pid)
        rss += rss_pid
        by_title[process_title(pid)] += rss_pid / 1024
    biggest = sorted(by_title.items(), key=lambda item: -item[1])  # every title, biggest first
    return {
        "processes": len(pids),
        "rss_mib": round(rss / 1024, 1),
        "pss_mib": round(pss / 1024, 1),
        "rss_mib_by_title": {title: round(mib, 1) for title, mib in biggest},
    }


def process_title(pid: int) -> str:
    """A short title: Ray's retitled worker name, else the executable's base name."""
    with contextlib.suppress(OSError):
        words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().split()
        if words and words[0].startswith("ray::"):
            return words[0]
        if words:
            name = Path(words[0]).name
            script = next((Path(word).name for word in words[1:] if word.endswith(".py")), "")
            return f"{name} {script}".strip()
    return "?"


def milestones(log: str, launched_at: datetime) -> dict[str, float]:
    """Seconds from launch to each milestone found in the log (its first occurrence)."""
    found: dict[str, float] = {}
    for line in log.splitlines():
        for name, marker in MILESTONES.items():
            stamp = TIMESTAMP.search(line)
            if name not in found and marker in line and stamp:
                moment = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
                found[name] = round((moment - launched_at).total_seconds(), 2)
    return dict(sorted(found.items(), key=lambda item: item[1]))


def time_service(launcher: str, model: str, idle_s: float) -> dict[str, Any]:
    """Launch the service one way, time its first 200, then measure it idle; stop it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RERANK_"))}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RERANK_MODEL=model)
    with tempfile.TemporaryFile("w+") as log:
        launched_at = datetime.now()
        started = time.monotonic()
        process = subprocess.Popen(
            LAUNCHERS[launcher],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            answered = first_answer(8000, 180)
            time.sleep(idle_s)
            idle = footprint(process.pid)
        finally:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)
            stop_cluster(process.pid)
        log.seek(0)
        marks = milestones(log.read(), launched_at)
    return {"cold_start_s": round(answered - started, 2), "milestones_s": marks, "idle": idle}


def time_job(model: str) -> dict[str, Any]:
    """``python -m jobs.rescore`` on 2,000 pairs in one file: wall time to the summary line, memory."""
    with tempfile.TemporaryDirectory() as tmp:
        write_pairs(Path(tmp) / "in", 2_000, 1)
        args = ["--input", f"{tmp}/in", "--output", f"{tmp}/out", "--model", model, "--overwrite"]
        return run_job(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TWIN_MODEL))
    parser.add_argument(
        "--launchers", default=",".join(LAUNCHERS), help="comma-separated: " + ", ".join(LAUNCHERS)
    )
    parser.add_argument("--idle-s", type=float, default=10.0, help="quiet seconds before the idle footprint")
    parser.add_argument("--no-job", action="store_true", help="time the service only")
    args = parser.parse_args()
    report: dict[str, Any] = {"model": args.model, "cpus": os.cpu_count()}
    for launcher in args.launchers.split(","):
        report[f"service_{launcher}"] = time_service(launcher, args.model, args.idle_s)
    if not args.no_job:
        report["job"] = time_job(args.model)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
