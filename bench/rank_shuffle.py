"""Memory per Ray worker of the per-query ranking shuffle (``jobs.ranking``) on synthetic rows; prints JSON.

Builds ``--rows`` scored rows (``--rows-per-query`` per query, a passage of ``--passage-bytes``) on
in-process Ray, groups them by query into each of ``--partitions`` hash partitions and ranks every
group with the job's ``rank_group``, as a ranked job's last phase does (the commit is a row count).
Samples every Ray worker process's RSS (object-store pages it maps included) and its own memory
(anonymous pages: the heap, not the object store), each size on a Ray of its own.
A job of R rows gets ``rank_partitions(R)`` partitions (at most 200), so R / that many rows per
reducer: ``--partitions`` chooses that size on rows that fit this machine (10^8 rows: 500,000).

    python -m bench.rank_shuffle [--rows 1000000 2000000] [--partitions 10 2] [--rows-per-query 100]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from bench.harness import rss_kib
from jobs.ranking import MAX_RANK_PARTITIONS, POSITION_COLUMN, rank_group, rank_partitions


def worker_pids() -> dict[int, str]:
    """The Ray workers of this driver (its raylet's ``default_worker.py`` children, retitled ``ray::...``).

    Other Ray instances on the machine (other jobs, tests) are left out.
    """
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                titles[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except (OSError, IndexError, ValueError):
                continue
    return {
        pid: title[:60]
        for pid, title in titles.items()
        if (title.startswith("ray::") or "default_worker.py" in title) and _descends(pid, parents)
    }


def anonymous_kib(pid: int) -> int:
    """A process's own memory (KiB): its anonymous pages, not the object store's shared pages it maps."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descends(pid: int, parents: dict[int, int]) -> bool:
    """Whether ``pid`` is a descendant of this process."""
    while pid > 1:
        pid = parents.get(pid, 0)
        if pid == os.getpid():
            return True
    return False


class WorkerPeaks(threading.Thread):
    """Each worker's peak RSS and peak own (anonymous) memory, in KiB, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.stopped = interval_s, threading.Event()
        self.rss: dict[int, int] = {}
        self.own: dict[int, int] = {}
        self.titles: dict[int, str] = {}  # what each process was doing at its peak

    def run(self) -> None:
        """Sample until stopped."""
        while not self.stopped.is_set():
            for pid, title in worker_pids().items():
                rss = rss_kib(pid)
                if rss > self.rss.get(pid, 0):
                    self.rss[pid], self.titles[pid] = rss, title
                self.own[pid] = max(self.own.get(pid, 0), anonymous_kib(pid))
            self.stopped.wait(self.interval_s)


def scored_rows(batch: dict[str, np.ndarray], rows_per_query: int, passage_bytes: int) -> pa.Table:
    """Synthetic scored rows for ids ``batch["id"]``: query id, passage, raw score, input position."""
    ids = batch["id"].astype(np.int64)
    passages = pa.array([f"{value:012d}".ljust(passage_bytes, "x") for value in ids.tolist()])
    scores = np.random.default_rng(int(ids[0])).normal(size=len(ids)).astype(np.float32)
    return pa.table(
        {
            "qid": pa.array([f"q{value // rows_per_query:09d}" for value in ids.tolist()]),
            "passage": passages,
            "score": scores,
            POSITION_COLUMN: ids,
        }
    )


def measure(rows: int, partitions: int, rows_per_query: int, passage_bytes: int) -> dict[str, Any]:
    """Rank ``rows`` synthetic rows over ``partitions`` hash partitions; worker peaks and seconds."""
    dataset = ray.data.range(rows, override_num_blocks=max(1, rows // 100_000)).map_batches(
        scored_rows,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={"rows_per_query": rows_per_query, "passage_bytes": passage_bytes},
        batch_format="numpy",
        batch_size=None,
    )
    ranked = dataset.groupby("qid", num_partitions=partitions).map_groups(
        rank_group,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={
            "score_column": "score",
            "position_column": POSITION_COLUMN,
            "add_rank": True,
            "top_k": None,
        },
        batch_format="pyarrow",
    )
    counted = ranked.map_batches(
        lambda batch: pa.table({"rows": [batch.num_rows]}), batch_size=None, batch_format="pyarrow"
    )
    peaks = WorkerPeaks()
    peaks.start()
    started = time.perf_counter()
    written = sum(int(row["rows"]) for row in counted.iter_rows())
    seconds = time.perf_counter() - started
    peaks.stopped.set()
    peaks.join()
    assert written == rows
    return {
        "rows": rows,
        "partitions": partitions,
        "rows_per_partition": rows // partitions,
        "seconds": round(seconds, 1),
        "workers": len(peaks.rss),
        "max_worker_rss_mib": round(max(peaks.rss.values(), default=0) / 1024, 1),
        "max_worker_own_mib": round(max(peaks.own.values(), default=0) / 1024, 1),
        "largest_workers": _largest(peaks),
    }


def _largest(peaks: WorkerPeaks, count: int = 4) -> list[dict[str, Any]]:
    """The ``count`` workers of largest own memory: what each was doing at its RSS peak, and both peaks."""
    order = sorted(peaks.own, key=lambda pid: -peaks.own[pid])[:count]
    return [
        {
            "title": peaks.titles.get(pid, ""),
            "rss_mib": round(peaks.rss[pid] / 1024),
            "own_mib": round(peaks.own[pid] / 1024),
        }
        for pid in order
    ]


def in_fresh_ray(rows: int, partitions: int, rows_per_query: int, passage_bytes: int) -> dict[str, Any]:
    """:func:`measure` on a Ray of its own (workers that ran an earlier size would carry its peaks)."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=3 * 1024**3, log_to_driver=False)
    try:
        return measure(rows, partitions, rows_per_query, passage_bytes)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--partitions", type=int, nargs="+", default=[10, 2])
    parser.add_argument("--rows-per-query", type=int, default=100)
    parser.add_argument("--passage-bytes", type=int, default=400)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.data.DataContext.get_current()
    sizes = [(rows, count) for rows in args.rows for count in args.partitions]
    runs = [in_fresh_ray(rows, count, args.rows_per_query, args.passage_bytes) for rows, count in sizes]
    target = 10**8
    report = {
        "cpus": 2,
        "ray": ray.__version__,
        "shuffle_strategy": str(getattr(context, "shuffle_strategy", "")),
        "rows_per_query": args.rows_per_query,
        "passage_bytes": args.passage_bytes,
        "runs": runs,
        "at_1e8_rows": {
            "partitions": rank_partitions(target),
            "rows_per_partition": target // min(MAX_RANK_PARTITIONS, rank_partitions(target)),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
