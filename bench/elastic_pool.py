"""What an elastic scoring pool costs on a fixed multi-node cluster; prints JSON.

The job with the pool it plans (it may shrink to one actor, so the job survives a node loss) against the
same pool fixed (min = max, which hangs after a node loss), runs alternated on one cluster.

The cluster is real Ray on 127.0.0.1: a head of 0 CPUs and ``--workers`` worker nodes of 2 CPUs (one
scoring actor and one tokenize/commit CPU each, the plan's shape). On this 2-core machine the workers'
CPUs are oversubscribed, so tokenization is slow and the actors often wait for input: the case where
Ray Data shrinks an elastic pool. Each run reports its wall time and how many scoring actors it
started (more than planned: the pool shrank and grew back) and the pool's size at each of Ray Data's
progress reports (every ~10 s).

    python -m bench.elastic_pool [--pairs 48000] [--rows-per-unit 1000] [--runs 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import actor_pool_plan, write_pairs
from bench.serve_chaos import Cluster
from tests.helpers import REPO_ROOT, TWIN_MODEL

# The job as users run it, with the planned pool made fixed (min = max) for the "fixed" arm.
FIXED_POOL = """
import dataclasses, runpy, sys
import jobs.resources as resources
planned = resources.plan_actor_pool
resources.plan_actor_pool = lambda *a, **k: dataclasses.replace(planned(*a, **k), min_actors=None)
sys.argv = ["jobs.rescore", *sys.argv[1:]]
runpy.run_module("jobs.rescore", run_name="__main__", alter_sys=True)
"""
SCORING_OPERATOR = "MapBatches(ScoreUnits)"
SCORING_ACTOR = f"MapWorker({SCORING_OPERATOR})"


def run_once(cluster: Cluster, pool: str, source: Path, output: Path, job_args: list[str]) -> dict[str, Any]:
    """One job on the cluster: wall time, the plan logged, scoring actors started, the pool's sizes."""
    before = scoring_actors(cluster)
    args = ["--input", str(source), "--output", str(output), *job_args]
    job = ["-c", FIXED_POOL] if pool == "fixed" else ["-m", "jobs.rescore"]
    command = [sys.executable, *job, *args]
    env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{pool} job failed:\n{done.stderr[-4000:]}")
    shutil.rmtree(output)
    return {
        "pool": pool,
        "wall_s": round(wall, 2),
        "plan": actor_pool_plan(done.stderr),
        "scoring_actors_started": scoring_actors(cluster) - before,
        "pool_sizes": pool_sizes(done.stderr),
    }


def pool_sizes(log: str) -> list[int]:
    """The scoring pool's actors at each progress report of Ray Data (the line after the operator's)."""
    lines = log.splitlines()
    reports = [lines[n + 1] for n, line in enumerate(lines[:-1]) if f"-- {SCORING_OPERATOR}: " in line]
    return [int(match.group(1)) for line in reports if (match := re.search(r"Actors: (\d+)", line))]


def scoring_actors(cluster: Cluster) -> int:
    """Scoring actors the cluster has ever started (alive or dead), from the state API (`ray list`)."""
    command = [
        str(Path(sys.executable).parent / "ray"), "list", "actors", "--address",
        f"http://127.0.0.1:{cluster.dashboard_port}", "--filter", f"class_name={SCORING_ACTOR}",
        "--limit", "10000", "--format", "json",
    ]  # fmt: skip
    listed = subprocess.run(command, env=cluster.env, capture_output=True, text=True, check=True, timeout=120)
    return 0 if listed.stdout.startswith("No resource") else len(json.loads(listed.stdout))


def main() -> None:
    """Start the cluster, alternate elastic and fixed runs, print each run and the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48_000)
    parser.add_argument("--rows-per-unit", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default=str(TWIN_MODEL))
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="elastic-pool-"))
    job_args = ["--model", options.model, "--rows-per-unit", str(options.rows_per_unit)]
    cluster = Cluster(serve_env={}, num_cpus=0)
    try:
        source = workdir / "in"
        write_pairs(source, options.pairs, num_files=8)
        cluster.start()
        for _ in range(options.workers):
            cluster.add_worker(num_cpus=2)
        runs = [
            run_once(cluster, pool, source, workdir / "out", job_args)
            for _ in range(options.runs)
            for pool in ("elastic", "fixed")
        ]
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"pairs": options.pairs, "workers": options.workers, "runs": runs}
    print(json.dumps(report | medians(runs, options.pairs)))


def medians(runs: list[dict[str, Any]], pairs: int) -> dict[str, Any]:
    """Each arm's median pairs/s, and elastic over fixed."""
    rates = {}
    for pool in ("elastic", "fixed"):
        walls = sorted(run["wall_s"] for run in runs if run["pool"] == pool)
        rates[pool] = round(pairs / walls[len(walls) // 2], 1)
    return {"pairs_per_s": rates, "elastic_over_fixed": round(rates["elastic"] / rates["fixed"], 3)}


if __name__ == "__main__":
    main()
