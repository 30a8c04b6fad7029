"""What the offline benchmarks share: realistic pairs on disk, and a job run measured from outside.

Pairs recombine the DL19/DL20 queries and passages in ``../shared/data`` at random (seeded), so the
text has real MS MARCO lengths and vocabulary. The job runs as users run it, ``python -m
jobs.rescore`` in a subprocess (a POSIX session of its own, with its own embedded Ray), while a
thread samples the memory of every process in that session.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import DL19_TSV, DL20_TSV, read_trec_tsv  # noqa: E402
from tests.integration.processes import session_pids  # noqa: E402


def trec_texts() -> tuple[np.ndarray, np.ndarray]:
    """The distinct queries and passages of DL19 + DL20 (BM25 top-100)."""
    frame = pd.concat([read_trec_tsv(DL19_TSV), read_trec_tsv(DL20_TSV)], ignore_index=True)
    return frame["query"].unique(), frame["passage"].unique()


def recombined_pairs(num_pairs: int, seed: int = 0) -> pa.Table:
    """``num_pairs`` rows of (qid, pid, query, passage): random DL19/DL20 queries and passages."""
    queries, passages = trec_texts()
    rng = np.random.default_rng(seed)
    query_ids = rng.integers(0, len(queries), num_pairs)
    passage_ids = rng.integers(0, len(passages), num_pairs)
    return pa.table(
        {
            "qid": query_ids.astype(np.int64),
            "pid": np.arange(num_pairs, dtype=np.int64),
            "query": pa.array(queries[query_ids].tolist(), pa.string()),
            "passage": pa.array(passages[passage_ids].tolist(), pa.string()),
        }
    )


def write_pairs(directory: Path, num_pairs: int, num_files: int, seed: int = 0) -> list[Path]:
    """Write recombined pairs as ``num_files`` Parquet files (row groups of 10,000 rows)."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, num_pairs, num_files + 1).astype(int)
    paths = []
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        path = directory / f"pairs-{index:04d}.parquet"
        pq.write_table(recombined_pairs(int(stop - start), seed + index), path, row_group_size=10_000)
        paths.append(path)
    return paths


def rss_kib(pid: int) -> int:
    """Resident set size (KiB) of one process from /proc/PID/status (cheap); 0 when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size (KiB): shared pages split among their users.

    Reading it walks the page tables (holding the process's mmap lock), so it is sampled rarely.
    """
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class MemorySampler(threading.Thread):
    """Samples the summed memory of a session's processes; keeps the peaks of driver and the rest.

    RSS every second (double-counts pages that processes share, e.g. the object store and
    libraries); PSS every ``pss_every`` samples.
    """

    def __init__(self, session_id: int, interval_s: float = 1.0, pss_every: int = 5) -> None:
        super().__init__(daemon=True)
        self.session_id, self.interval_s, self.pss_every = session_id, interval_s, pss_every
        self.peaks = {"driver_rss": 0, "workers_rss": 0, "total_rss": 0, "total_pss": 0}
        self.stopped = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        count = 0
        while not self.stopped.is_set():
            pids = session_pids(self.session_id)
            driver = rss_kib(self.session_id)
            workers = sum(rss_kib(pid) for pid in pids if pid != self.session_id)
            sample = {"driver_rss": driver, "workers_rss": workers, "total_rss": driver + workers}
            if count % self.pss_every == 0:
                sample["total_pss"] = sum(pss_kib(pid) for pid in pids)
            self.peaks = {key: max(value, sample.get(key, 0)) for key, value in self.peaks.items()}
            count += 1
            self.stopped.wait(self.interval_s)

    def report_mib(self) -> dict[str, float]:
        """Peaks in MiB."""
        return {f"peak_{key}_mib": round(value / 1024, 1) for key, value in self.peaks.items()}


def run_job(args: Sequence[str], env_overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m jobs.rescore ARGS`` in its own session; wall time, summary, stage seconds, memory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RERANK_"))}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", **(env_overrides or {}))
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.rescore", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    sampler = MemorySampler(process.pid)
    sampler.start()
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    out, summary_s = _read_until_summary(process, started)
    process.wait()
    reader.join()
    wall, err = time.perf_counter() - started, "".join(errors)
    sampler.stopped.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"job failed ({process.returncode}):\n{err[-4000:]}")
    return {
        "wall_s": round(wall, 2),
        "summary_line_s": summary_s,  # to the summary line; wall_s adds the embedded Ray's shutdown
        "started_at": time.time() - wall,
        "summary": out.strip().splitlines()[-1],
        "stage_seconds": _stage_seconds(err),
        "actor_pool": actor_pool_plan(err),
        **sampler.report_mib(),
    }


def actor_pool_plan(log: str) -> str:
    """The job's actor pool plan (actors, CPUs/GPUs each, torch threads, tokenize tasks) from its log."""
    lines = [line.split("actor pool: ", 1)[1] for line in log.splitlines() if "actor pool: " in line]
    return lines[-1] if lines else ""


def _read_until_summary(process: subprocess.Popen[str], started: float) -> tuple[str, float | None]:
    """The job's whole stdout, and the seconds from ``started`` to its summary line."""
    lines: list[str] = []
    summary_s = None
    for line in process.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if summary_s is None and line.startswith("rescore:"):
            summary_s = round(time.perf_counter() - started, 2)
    return "".join(lines), summary_s


def _stage_seconds(log: str) -> dict[str, float]:
    marker = "stage seconds: "
    lines = [line for line in log.splitlines() if marker in line]
    return json.loads(lines[-1].split(marker, 1)[1]) if lines else {}
