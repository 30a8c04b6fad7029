"""Memory per Ray worker of the per-query ranking shuffle (``jobs.ranking``) on synthetic rows; prints JSON.

Builds ``--rows`` scored rows (``--rows-per-query`` per query: a query id and ~40 bytes of query text,
a passage of ``--passage-bytes`` random letters, a raw score, the input position) in blocks of a work
unit's 20,000 rows on in-process Ray (2 CPUs), groups them by query and ranks every group with the
job's ``rank_group``, as a ranked job's last phase does (the commit is a row count). Samples every
Ray worker's RSS (object-store pages it maps included) and own memory (anonymous pages: its heap),
by what it was running, and the driver's; each run on a Ray of its own.

A row here stands for ``--scale`` rows of a job (default 100: 10^6 rows here are 10^8 there): each
variant gets the partitions the job would make for ``rows * scale`` rows, divided by ``scale``, so a
reduce task holds what it would hold in that job. Variants:

- ``current``: the job before the fix: ``min(200, rows / 100,000)`` partitions, Ray's default settings
- ``fix``: the job's ``rank_partitions`` (bounded bytes per partition) in ``ranking_data_context``
- ``narrow``: ``current`` shuffling only the query id, score and position (candidate (a)'s shuffle)
- ``sort``: Ray's pull-based sort shuffle (``SORT_SHUFFLE_PULL_BASED``: as many ranges as input blocks)
- ``aggregators``: Ray's ``HASH_SHUFFLE`` (aggregator actors, one per CPU up to 128, hold every row)

``at_1e8_rows`` projects each variant's phases to 10^8 rows on a 16-CPU cluster: a straight line
through its runs of own memory against the bytes a task of that phase holds, read at the bytes it
would hold there.

    python -m bench.rank_shuffle [--rows 1000000 2000000] [--variants current fix] [--passage-bytes 400]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.context import ShuffleStrategy

from bench.harness import rss_kib
from jobs.ranking import (
    POSITION_COLUMN,
    RANK_MAP_BATCH_BYTES,
    rank_group,
    rank_partitions,
    ranking_data_context,
)

ROWS_PER_BLOCK = 20_000  # a work unit's rows (--rows-per-unit): one scored file, one block read
CPUS = 2
TARGET_ROWS, TARGET_CPUS = 10**8, 16
RAY_MAP_BATCH_BYTES = 2**30  # Ray Data's DataContext.shuffle_input_batch_bytes
INPUT_COLUMNS = ("qid", "query", "passage")  # a scored row's input part; score and position are the job's
NARROW_COLUMNS = ("qid", "score", POSITION_COLUMN)


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
        pid: title
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


def phase_of(title: str) -> str:
    """What a worker runs, from its title (``ray::HashShuffleAggregator.finalize()``: the aggregator)."""
    name = title.removeprefix("ray::").split("(")[0].split("->")[0].split(".")[0].split(":")[-1].strip()
    return name if title.startswith("ray::") and name else "starting"


class WorkerPeaks(threading.Thread):
    """Peak RSS and own (anonymous) memory (KiB) of each worker, each phase and the driver.

    A phase is what a worker was running when sampled (``phase_of``); samples every ``interval_s``.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.stopped = interval_s, threading.Event()
        self.workers: dict[int, tuple[int, int]] = {}
        self.phases: dict[str, tuple[int, int]] = {}
        self.driver = (0, 0)
        self.driver_at_start = anonymous_kib(os.getpid())

    def run(self) -> None:
        """Sample until stopped."""
        while not self.stopped.is_set():
            for pid, title in worker_pids().items():
                sample = (rss_kib(pid), anonymous_kib(pid))
                self.workers[pid] = _larger(self.workers.get(pid), sample)
                self.phases[phase_of(title)] = _larger(self.phases.get(phase_of(title)), sample)
            self.driver = _larger(self.driver, (rss_kib(os.getpid()), anonymous_kib(os.getpid())))
            self.stopped.wait(self.interval_s)


def _larger(peak: tuple[int, int] | None, sample: tuple[int, int]) -> tuple[int, int]:
    return sample if peak is None else (max(peak[0], sample[0]), max(peak[1], sample[1]))


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def random_text(rng: np.random.Generator, rows: int, length: int) -> pa.Array:
    """``rows`` strings of ``length`` random lowercase letters and spaces (zstd: ~1.7x; English ~3.8x)."""
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    data = alphabet[rng.integers(0, len(alphabet), rows * length)]
    offsets = np.arange(0, rows * length + 1, length, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def scored_rows(batch: dict[str, np.ndarray], rows_per_query: int, passage_bytes: int) -> pa.Table:
    """Synthetic scored rows for ids ``batch["id"]``: query id and text, passage, raw score, position."""
    ids = batch["id"].astype(np.int64)
    rng = np.random.default_rng(int(ids[0]))
    queries, first = np.unique(ids // rows_per_query, return_inverse=True)
    return pa.table(
        {
            "qid": pa.array([f"q{value:09d}" for value in (ids // rows_per_query).tolist()]),
            "query": random_text(rng, len(queries), 40).take(pa.array(first)),
            "passage": random_text(rng, len(ids), passage_bytes),
            "score": rng.normal(size=len(ids)).astype(np.float32),
            POSITION_COLUMN: ids,
        }
    )


@dataclass(frozen=True)
class Variant:
    """How one candidate shuffles: its partitions for ``rows`` (a job's), Ray settings, columns kept."""

    partitions: Callable[[int, int], int]  # (job rows, job input bytes) -> partitions
    context: Callable[[], contextlib.AbstractContextManager[None]]
    columns: Sequence[str] | None = None
    map_batch_bytes: int = RAY_MAP_BATCH_BYTES
    hash_map: bool = True  # map tasks partition into every partition (a run with the job's count shows them)


@contextlib.contextmanager
def shuffle_strategy(strategy: ShuffleStrategy | None) -> Iterator[None]:
    """The process's Ray Data shuffle strategy set to ``strategy`` (None: Ray's default), then restored."""
    context = ray.data.DataContext.get_current()
    saved = context.shuffle_strategy
    context.shuffle_strategy = strategy or saved
    try:
        yield
    finally:
        context.shuffle_strategy = saved


def _current(rows: int, _: int) -> int:
    return rank_partitions(rows)


VARIANTS = {
    "current": Variant(_current, lambda: shuffle_strategy(None)),
    "fix": Variant(rank_partitions, ranking_data_context, map_batch_bytes=RANK_MAP_BATCH_BYTES),
    "narrow": Variant(_current, lambda: shuffle_strategy(None), NARROW_COLUMNS),
    "sort": Variant(
        _current, lambda: shuffle_strategy(ShuffleStrategy.SORT_SHUFFLE_PULL_BASED), hash_map=False
    ),
    "aggregators": Variant(_current, lambda: shuffle_strategy(ShuffleStrategy.HASH_SHUFFLE), hash_map=False),
}


def row_bytes(rows_per_query: int, passage_bytes: int, columns: Sequence[str] | None = None) -> float:
    """Arrow bytes per synthetic row (of ``columns`` only, when given)."""
    table = scored_rows({"id": np.arange(ROWS_PER_BLOCK)}, rows_per_query, passage_bytes)
    return (table.select(list(columns)) if columns else table).nbytes / ROWS_PER_BLOCK


def measure(
    rows: int, partitions: int, args: argparse.Namespace, columns: Sequence[str] | None
) -> dict[str, Any]:
    """Rank ``rows`` synthetic rows over ``partitions`` partitions: peaks by worker and phase, seconds."""
    dataset = ray.data.range(rows, override_num_blocks=max(1, rows // ROWS_PER_BLOCK)).map_batches(
        scored_rows,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={"rows_per_query": args.rows_per_query, "passage_bytes": args.passage_bytes},
        batch_format="numpy",
        batch_size=None,
    )
    if columns:
        dataset = dataset.select_columns(list(columns))
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
        "seconds": round(seconds, 1),
        "workers": len(peaks.workers),
        "max_worker_rss_mib": _mib(max((rss for rss, _ in peaks.workers.values()), default=0)),
        "max_worker_own_mib": _mib(max((own for _, own in peaks.workers.values()), default=0)),
        "phases": {
            name: {"rss_mib": _mib(rss), "own_mib": _mib(own)}
            for name, (rss, own) in sorted(peaks.phases.items())
        },
        "driver": {  # this process: earlier runs' leftovers included, hence what this run added
            "rss_mib": _mib(peaks.driver[0]),
            "own_mib": _mib(peaks.driver[1]),
            "own_added_mib": _mib(peaks.driver[1] - peaks.driver_at_start),
        },
    }


def held_mib(
    name: str, phase: str, rows: int, per_row: float, partitions: int, map_batch: int, cpus: int
) -> float | None:
    """The rows (MiB) one task of ``phase`` holds in variant ``name``; None for phases that hold none.

    A hash-shuffle map task holds its input batch, a reduce task (and the ranking fused into it) its
    partition, an aggregator its share of every row, a sort task one input block's worth.
    """
    total = rows * per_row
    if name == "sort" and phase in ("map", "reduce", "MapBatches"):
        held = min(ROWS_PER_BLOCK, rows) * per_row
    elif phase == "HashShuffleAggregator":
        held = total / min(cpus, 128)
    elif phase == "HashShuffleMap":
        held = min(map_batch, total)
    elif phase in ("HashShuffleReduce", "MapBatches"):
        held = total / partitions
    else:
        return None
    return round(held / 2**20, 1)


def run_variant(name: str, rows: int, args: argparse.Namespace, as_job: bool = False) -> dict[str, Any]:
    """One variant on ``rows`` rows, on a Ray of its own (workers that ran another would carry its peaks).

    ``as_job``: with as many partitions as the job would make, not divided by ``--scale``: a map task
    then holds what it holds in the job (its input, and one partition's shards at a time), and reduce
    tasks hold less.
    """
    variant = VARIANTS[name]
    per_row = row_bytes(args.rows_per_query, args.passage_bytes, variant.columns)
    input_row = row_bytes(args.rows_per_query, args.passage_bytes, INPUT_COLUMNS)
    job_partitions = variant.partitions(rows * args.scale, int(rows * args.scale * input_row))
    partitions = job_partitions if as_job else max(1, math.ceil(job_partitions / args.scale))
    start_ray(args.object_store_gib * 2**30)
    try:
        with variant.context():
            result = measure(rows, partitions, args, variant.columns)
    finally:
        ray.shutdown()
    phases = {phase: peak for phase, peak in result.pop("phases").items() if not _system(phase)}
    for phase, peak in phases.items():
        peak["held_mib"] = held_mib(name, phase, rows, per_row, partitions, variant.map_batch_bytes, CPUS)
    return {
        "variant": name,
        "rows": rows,
        "as_job_rows": rows * args.scale,
        "bytes_per_row": round(per_row, 1),
        "partitions": partitions,
        "partitions_as_in_job": as_job,
        "partition_mib": round(rows * per_row / partitions / 2**20, 1),
        **result,
        "phases": phases,
    }


def start_ray(object_store_bytes: int, tries: int = 3) -> None:
    """A new in-process Ray of ``CPUS`` CPUs (never another's); tried again if its startup times out."""
    for attempt in range(1, tries + 1):
        try:
            ray.init(
                address="local",
                num_cpus=CPUS,
                include_dashboard=False,
                object_store_memory=object_store_bytes,
                log_to_driver=False,
            )
            return
        except Exception:  # Ray raises a bare Exception when its node does not start in time
            ray.shutdown()
            if attempt == tries:
                raise


def _system(phase: str) -> bool:
    """Ray's own processes (agents, Ray Data's coordinator actors) and workers still starting."""
    return phase == "starting" or phase.startswith("_") or phase.endswith("Agent")


def projection(name: str, runs: Sequence[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """A variant's phases at 10^8 rows on 16 CPUs: own memory on the line through its runs.

    A hash shuffle's map tasks are read from its runs with the job's partitions, the rest from the others.
    """
    variant, ours = VARIANTS[name], [run for run in runs if run["variant"] == name]
    per_row = ours[0]["bytes_per_row"]
    input_row = row_bytes(args.rows_per_query, args.passage_bytes, INPUT_COLUMNS)
    partitions = variant.partitions(TARGET_ROWS, int(TARGET_ROWS * input_row))
    total, blocks = TARGET_ROWS * per_row, TARGET_ROWS // ROWS_PER_BLOCK
    map_tasks = math.ceil(total / variant.map_batch_bytes) if variant.hash_map else blocks
    sort_ranges = blocks if name == "sort" else partitions  # a sort cuts every block into as many ranges
    phases = {}
    for phase in sorted({phase for run in ours for phase in run["phases"]}):
        points = [
            (run["phases"][phase]["held_mib"], run["phases"][phase]["own_mib"])
            for run in ours
            if phase in run["phases"] and _faithful(variant, run, phase)
        ]
        held = held_mib(name, phase, TARGET_ROWS, per_row, partitions, variant.map_batch_bytes, TARGET_CPUS)
        if held is not None and points and points[0][0] is not None:
            phases[phase] = {"held_mib": held, "own_mib": round(_on_line(points, held), 1)}
    return {
        "variant": name,
        "partitions": sort_ranges,
        "partition_mib": round(total / sort_ranges / 2**20, 1),
        "map_tasks": map_tasks,
        "shards": map_tasks * sort_ranges,
        "shard_kib": round(total / (map_tasks * sort_ranges) / 1024, 1),
        "phases": phases,
    }


def _faithful(variant: Variant, run: dict[str, Any], phase: str) -> bool:
    """Whether ``run`` holds in ``phase`` what the job would (see ``run_variant``'s ``as_job``)."""
    return not variant.hash_map or run["partitions_as_in_job"] == (phase == "HashShuffleMap")


def _on_line(points: Sequence[tuple[float, float]], x: float) -> float:
    """``y`` at ``x`` on the straight line through the two points furthest apart in ``x`` (flat for one)."""
    (x0, y0), (x1, y1) = min(points), max(points)
    return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["current", "fix"])
    parser.add_argument("--scale", type=int, default=100, help="job rows each row here stands for")
    parser.add_argument("--rows-per-query", type=int, default=100)
    parser.add_argument("--passage-bytes", type=int, default=400)
    parser.add_argument("--object-store-gib", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runs = [
        run_variant(name, rows, args, as_job)
        for name in args.variants
        for rows in args.rows
        for as_job in ((False, True) if VARIANTS[name].hash_map else (False,))
    ]
    report = {
        "cpus": CPUS,
        "ray": ray.__version__,
        "default_shuffle_strategy": str(ray.data.DataContext.get_current().shuffle_strategy),
        "rows_per_query": args.rows_per_query,
        "passage_bytes": args.passage_bytes,
        "scale": args.scale,
        "runs": runs,
        "at_1e8_rows": [projection(name, runs, args) for name in args.variants],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
