"""The driver at scale, by simulation: what the job does on the driver, timed and measured per step.

A stub fsspec filesystem (``simfs://``) answers listings, ``info`` and opens without any data: every
input file is served as the same real Parquet file of ``--rows-per-file`` rows (its footer is what the
driver reads), and every committed unit file as the same real Parquet file carrying its counts in its
footer. The job's own driver functions run on it as a run and a resume run them: listing, footer reads
and checks, the output check, unit planning, the manifest (and its JSON size), ``resume_or_start`` on a
new output and again against an equal manifest, then the resume check against every unit committed
(listing their names, reading their counts, the rows check) and the final row count. For each step:
wall seconds, the Python heap's peak (tracemalloc), the process's peak RSS (sampled), and the storage
calls made (each a round trip on an object store). ``--latency-ms`` makes every call sleep as long, to
show which steps make their round trips one after another. No Ray.

    python -m bench.driver_scale [--files 1000 10000 100000] [--rows-per-file 10000] [--latency-ms 0]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from jobs.commit import COUNTS_KEY, committed_counts, list_names
from jobs.manifest import job_manifest, read_json, resume_or_start
from jobs.rescore import _rows_in, check_rows, expected_rows, kept_units
from jobs.settings import RescoreSettings
from jobs.storage import check_output_apart, count_rows, find_input_files, inspect_input, locate
from jobs.units import plan_units
from tests.helpers import TWIN_MODEL

INPUT = "/in"
OUTPUT = "/out"
MIB = 1024 * 1024
T = TypeVar("T")


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of one Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def input_file(rows: int) -> bytes:
    """An input file as a user's pandas would write it (its footer carries pandas' schema metadata)."""
    frame = pa.table({"qid": ["q"] * rows, "query": ["a query"] * rows, "passage": ["a passage"] * rows})
    return parquet_bytes(pa.Table.from_pandas(frame.to_pandas()))


def unit_file(rows: int) -> bytes:
    """A committed unit's file: ``rows`` rows, the unit's counts in its footer."""
    counts = {"rows": rows, "scored": rows, "null": 0, "truncated": 0}
    table = pa.table({"score": pa.array([0.5] * rows, pa.float32())})
    return parquet_bytes(table.replace_schema_metadata({COUNTS_KEY: json.dumps(counts).encode()}))


class SlowReader(io.BytesIO):
    """A file's bytes whose every read counts as a storage call (and sleeps the simulated latency)."""

    def __init__(self, data: bytes, filesystem: SimFileSystem) -> None:
        super().__init__(data)
        self.filesystem = filesystem

    def read(self, size: int | None = -1, /) -> bytes:
        """Read as BytesIO does, one round trip."""
        self.filesystem.call("read")
        return super().read(size)


class SimFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """``INPUT`` holds ``files`` Parquet files; ``OUTPUT`` the committed units and what the job writes."""

    protocol = "simfs"
    root_marker = "/"

    def __init__(
        self, files: int = 1000, rows_per_file: int = 10_000, latency_ms: float = 0.0, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.inputs = [f"{INPUT}/part-{index:06d}.parquet" for index in range(files)]
        self.input_bytes = input_file(rows_per_file)
        self.units: dict[str, bytes] = {}
        self.written: dict[str, bytes] = {}
        self.latency = latency_ms / 1000
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def call(self, kind: str, round_trips: int = 1) -> None:
        """Count a storage call (``round_trips`` requests) and wait out its latency."""
        with self.lock:
            self.calls[kind] += round_trips
        if self.latency:
            time.sleep(self.latency * round_trips)

    def commit_units(self, names: list[str], rows: int) -> None:
        """Make every named unit committed in ``OUTPUT``, each holding ``rows`` rows."""
        data = unit_file(rows)
        self.units = {f"{OUTPUT}/{name}": data for name in names}

    def _data(self, path: str) -> bytes:
        if path.startswith(INPUT + "/"):
            return self.input_bytes
        found = self.written.get(path, self.units.get(path))
        if found is None:
            raise FileNotFoundError(path)
        return found

    def _entry(self, path: str) -> dict[str, Any]:
        if path in (INPUT, OUTPUT):
            return {"name": path, "size": 0, "type": "directory"}
        etag = hashlib.md5(path.encode()).hexdigest()  # a stand-in ETag
        return {"name": path, "size": len(self._data(path)), "type": "file", "ETag": f'"{etag}"'}

    def _children(self, path: str) -> list[str]:
        path = path.rstrip("/")
        if path == INPUT:
            return self.inputs
        if path == OUTPUT:
            return sorted({*self.units, *self.written})
        raise FileNotFoundError(path)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """A directory's entries: one request per 1,000 (an S3 list page)."""
        names = self._children(path)
        self.call("list", max(1, -(-len(names) // 1000)))
        return [self._entry(name) for name in names] if detail else list(names)

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, **kwargs: Any) -> Any:
        """Every file under a directory (it has no subdirectories), paged like ``ls``."""
        path = self._strip_protocol(path)
        names = self._children(path)
        self.call("list", max(1, -(-len(names) // 1000)))
        if kwargs.get("detail"):
            return {name: self._entry(name) for name in names}
        return list(names)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """One HEAD request."""
        path = self._strip_protocol(path).rstrip("/") or "/"
        self.call("info")
        return self._entry(path)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        self.call("open")
        if "r" in mode:
            return SlowReader(self._data(path), self)
        raise NotImplementedError("the driver writes with pipe_file on object stores")

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """One PUT."""
        self.call("put")
        self.written[self._strip_protocol(path)] = bytes(value)


class Sampler:
    """Samples this process's RSS every few milliseconds; ``peak`` since the last ``reset``."""

    def __init__(self) -> None:
        self.peak = 0
        self.running = True
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def rss(self) -> int:
        """Resident bytes now."""
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def reset(self) -> None:
        """Start a new peak from the current RSS."""
        self.peak = self.rss()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)


class Meter:
    """Runs steps, recording each one's seconds, heap and RSS peaks, and storage calls."""

    def __init__(self, fs: SimFileSystem, files: int, heap: bool) -> None:
        self.fs, self.files, self.heap = fs, files, heap
        self.sampler = Sampler()
        self.steps: dict[str, dict[str, Any]] = {}

    def step(self, name: str, action: Callable[[], T]) -> T:
        """Run ``action`` as step ``name``; its result."""
        self.fs.calls.clear()
        self.sampler.reset()
        if self.heap:
            tracemalloc.reset_peak()
        started = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {"seconds": round(seconds, 3)}
        if self.heap:
            current, peak = tracemalloc.get_traced_memory()
            record |= {"heap_peak_mib": round(peak / MIB, 1), "heap_after_mib": round(current / MIB, 1)}
        record["rss_peak_mib"] = round(max(self.sampler.peak, self.sampler.rss()) / MIB, 1)
        calls = dict(sorted(self.fs.calls.items()))
        record |= {"calls": calls, "calls_per_file": round(sum(calls.values()) / self.files, 3)}
        self.steps[name] = record
        return result


def simulate(files: int, rows_per_file: int, latency_ms: float, heap: bool) -> dict[str, Any]:
    """Run the driver's steps of a first run and of a resume over ``files`` simulated input files."""
    options = {"files": files, "rows_per_file": rows_per_file, "latency_ms": latency_ms}
    fs = locate(f"simfs://{INPUT}", options).fs
    assert isinstance(fs, SimFileSystem)
    settings = RescoreSettings.load(
        input=f"simfs://{INPUT}", output=f"simfs://{OUTPUT}", model=str(TWIN_MODEL), storage_options=options
    )
    job, versions = settings.job, ["dir:simulated"]
    if heap:
        tracemalloc.start()
    meter = Meter(fs, files, heap)
    meter.step("listing", lambda: find_input_files(job.input or "", options))
    columns = ["query", "passage"]
    plan = meter.step("inspect_input", lambda: inspect_input(job.input or "", options, columns, ["score"]))
    meter.step(
        "check_output_apart", lambda: check_output_apart(plan, job.input or "", job.output or "", options)
    )
    groups = [footer.row_groups for footer in plan.footers]
    units = meter.step("plan_units", lambda: plan_units(plan.files, groups, job.rows_per_unit))
    manifest = meter.step("job_manifest", lambda: job_manifest(settings, plan, versions))
    output = locate(job.output or "", options)
    meter.step("resume_or_start_new", lambda: resume_or_start(output, manifest, job.output or ""))
    manifest_bytes = len(fs.written[f"{OUTPUT}/_rescore_job.json"])
    equal = json.loads(json.dumps(manifest))
    meter.step("resume_or_start_equal", lambda: resume_or_start(output, equal, job.output or ""))
    fs.commit_units([unit.name for unit in units], units[0].num_rows)
    committed = meter.step("list_committed", lambda: list_names(output) & {unit.name for unit in units})
    kept, dropped = meter.step("kept_units", lambda: kept_units(units, committed, dict(plan.skipped)))
    counts = meter.step("committed_counts", lambda: committed_counts(output, kept))
    expected = meter.step("check_rows", lambda: _checked(plan, counts))
    written = meter.step("count_rows", lambda: count_rows(output))
    assert (
        written == expected == files * rows_per_file and not dropped and read_json(output, "_SUCCESS") is None
    )
    if heap:
        tracemalloc.stop()
    meter.sampler.running = False
    return {
        "files": files,
        "rows": plan.num_rows,
        "units": len(units),
        "manifest_json_bytes": manifest_bytes,
        "total_seconds": round(sum(step["seconds"] for step in meter.steps.values()), 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "steps": meter.steps,
    }


def _checked(plan: Any, counts: dict[str, dict[str, Any]]) -> int:
    expected = expected_rows(plan, {})
    check_rows(_rows_in(counts), expected, "the scored units")
    return expected


def _in_own_process(files: int, args: argparse.Namespace) -> dict[str, Any]:
    """One size in a process of its own, so that its peak RSS is its own."""
    command = [sys.executable, "-m", "bench.driver_scale", "--single", "--files", str(files)]
    command += ["--rows-per-file", str(args.rows_per_file), "--latency-ms", str(args.latency_ms)]
    command += ["--no-heap"] if args.no_heap else []
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return dict(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="simulated latency of every storage call"
    )
    parser.add_argument("--no-heap", action="store_true", help="no tracemalloc (faster; RSS only)")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one size, this process
    args = parser.parse_args()
    fsspec.register_implementation("simfs", SimFileSystem, clobber=True)
    if args.single:
        print(json.dumps(simulate(args.files[0], args.rows_per_file, args.latency_ms, not args.no_heap)))
        return
    runs = [_in_own_process(files, args) for files in args.files]
    report: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "rows_per_file": args.rows_per_file,
        "latency_ms": args.latency_ms,
        "runs": runs,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
