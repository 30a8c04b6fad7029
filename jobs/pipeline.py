"""The job's pipeline: the scoring stage (``jobs.stage``) run on work units, then a commit per unit.

Each row of the job's dataset is one work unit: ``tokenize_units`` (CPU tasks) reads its rows and runs
the stage's ``tokenize_rows`` on them, ``ScoreUnits`` (the stage's ``ScoreRows`` on the actor pool)
scores them, ``commit_units`` (CPU tasks) writes the unit's output file atomically. A unit's rows travel
between the steps as Arrow IPC bytes, so no step can split or merge units: a unit is the grain of
commit and resume.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray.data

from jobs.cluster import cluster_shape
from jobs.commit import commit_table
from jobs.progress import Progress
from jobs.ranking import input_positions
from jobs.resources import (
    ActorPoolPlan,
    PoolSizing,
    object_store_budget,
    plan_actor_pool,
)
from jobs.retries import is_transient, with_retries
from jobs.settings import JobSettings
from jobs.stage import ScoreRows, ScoringSteps, append_scoring, tokenize_rows
from jobs.storage import Location
from jobs.units import WorkUnit, read_range
from reranker.errors import InputError
from reranker.settings import ModelOptions

logger = logging.getLogger("jobs.rescore")
ACTOR_INIT_DEATHS = 3  # scoring actors that may die while loading before the job fails (Ray's default: 0)
UNIT_FIELDS = [
    pa.field("name", pa.string()),
    pa.field("file_index", pa.int64()),
    pa.field("path", pa.string()),
    pa.field("row_start", pa.int64()),
    pa.field("row_stop", pa.int64()),
    pa.field("more_files", pa.string()),  # JSON [[file_index, path, row_start, row_stop], ...]
    pa.field("error", pa.string()),
    pa.field("skipped", pa.string()),  # JSON {path: reason}: packed files left out (--on-bad-file skip)
    pa.field("timings", pa.string()),
]
TOKENIZED_SCHEMA = pa.schema([*UNIT_FIELDS, pa.field("table", pa.large_binary())])
SCORED_SCHEMA = pa.schema(
    [*UNIT_FIELDS, pa.field("table", pa.large_binary()), pa.field("counts", pa.string())]
)
COMMITTED_SCHEMA = pa.schema([*UNIT_FIELDS, pa.field("counts", pa.string())])


@dataclass(frozen=True)
class UnitScoring:
    """What one scoring pass over work units reads and adds (a cascade makes one pass per stage)."""

    source: Location
    query_column: str
    passage_column: str
    score_column: str
    position_column: str | None = None  # add each row's input position (first pass of a ranked job)
    select_column: str | None = None  # score only the rows where this bool column is true
    skip_bad_files: bool = False  # a packed unit leaves out its unreadable files (--on-bad-file skip)


def build_pipeline(
    units: Sequence[WorkUnit],
    scoring: UnitScoring,
    options: ModelOptions,
    pool: ActorPoolPlan,
    destination: Location,
    io_cpus: float,
) -> ray.data.Dataset:
    """Units -> tokenize_units (CPU tasks) -> ScoreUnits (actor pool) -> commit_units (CPU tasks)."""
    dataset: ray.data.Dataset = ray.data.from_items(unit_rows(units), override_num_blocks=len(units))
    steps = ScoringSteps(
        tokenize=tokenize_units,
        scorer=ScoreUnits,
        batch_size=1,
        tokenize_kwargs={
            "source": scoring.source,
            "query_column": scoring.query_column,
            "passage_column": scoring.passage_column,
            "select_column": scoring.select_column,
            "skip_bad_files": scoring.skip_bad_files,
        },
        scorer_kwargs={"score_column": scoring.score_column, "position_column": scoring.position_column},
    )
    dataset = append_scoring(dataset, steps, options, pool, io_cpus)
    return dataset.map_batches(
        commit_units,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={"destination": destination},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=io_cpus,
    )


def score_units(
    units: Sequence[WorkUnit],
    scoring: UnitScoring,
    options: ModelOptions,
    job: JobSettings,
    destination: Location,
    sizing: PoolSizing | None = None,
    what: str = "stage 1",
) -> dict[str, str]:
    """Run the units through the pipeline on a pool sized for ``sizing`` (default: the job's settings).

    Each unit is committed as it finishes; the driver sees one small manifest row per unit, and logs a
    progress line (``jobs.progress``) at most every 10 s.

    Returns:
        Input files with a unit that could not be read, and why (``--on-bad-file skip``).

    Raises:
        InputError: A unit could not be read and ``--on-bad-file fail``; names the file.

    """
    pool = plan_actor_pool(cluster_shape(job.cluster_config), sizing or job, options.torch_threads)
    budget = object_store_budget(pool, job)
    logger.info("actor pool: %s, object store budget %d MiB", pool, budget // 2**20)
    bad_files: dict[str, str] = {}
    timings: list[dict[str, float]] = []
    progress = Progress(what, sum(unit.num_rows for unit in units))
    with job_data_context(budget):
        pipeline = build_pipeline(units, scoring, options, pool, destination, job.io_cpus)
        for row in pipeline.iter_rows():
            if row["error"] is not None:
                if job.on_bad_file == "fail":
                    raise InputError(row["error"] + " (pass --on-bad-file skip to leave bad files out)")
                logger.warning("skipping %s", row["error"])
                bad_files.update(json.loads(row["skipped"]))
                continue
            timings.append(json.loads(row["timings"]))
            counts = json.loads(row["counts"])
            progress.add(counts["rows"], counts["scored"])
    progress.log()
    logger.info("stage seconds: %s", json.dumps(stage_seconds(timings)))
    return bad_files


@contextlib.contextmanager
def job_data_context(object_store_bytes: int) -> Iterator[None]:
    """The job's Ray Data settings (actor deaths tolerated, object-store budget), restored afterwards.

    The process's ``DataContext`` is shared with whatever else runs there (a caller's own pipeline).
    """
    context = ray.data.DataContext.get_current()
    saved = (context.max_consecutive_actor_init_deaths, context.execution_options.resource_limits)
    context.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS
    limits = context.execution_options.resource_limits
    context.execution_options.resource_limits = limits.copy(object_store_memory=object_store_bytes)
    try:
        yield
    finally:
        context.max_consecutive_actor_init_deaths, context.execution_options.resource_limits = saved


def unit_rows(units: Sequence[WorkUnit]) -> list[dict[str, Any]]:
    """The job's input dataset: one row per work unit."""
    return [
        {
            "name": u.name,
            "file_index": u.file_index,
            "path": u.path,
            "row_start": u.row_start,
            "row_stop": u.row_stop,
            "more_files": json.dumps([[p.file_index, p.path, p.row_start, p.row_stop] for p in u.more_files]),
            "error": None,
            "skipped": "{}",
            "timings": "{}",
        }
        for u in units
    ]


def to_ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes (how a unit's rows travel between steps)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    """The table ``to_ipc`` wrote."""
    return pa.ipc.open_stream(data).read_all()


def tokenize_units(
    batch: pa.Table,
    source: Location,
    model_options: ModelOptions,
    query_column: str,
    passage_column: str,
    select_column: str | None = None,
    skip_bad_files: bool = False,
) -> pa.Table:
    """Ray Data task: read each unit's rows and tokenize them on CPU.

    A unit that can't be read becomes an error row naming the file (never committed). With
    ``skip_bad_files``, a packed unit leaves out only its unreadable files and says so in ``skipped``.
    """
    rows = []
    for unit in batch.to_pylist():
        started = time.perf_counter()
        tables, skipped = read_parts(source, _unit(unit), skip_bad_files)
        if not tables:
            path, error = next(iter(skipped.items()))
            rows.append({**unit, "path": path, "error": error, "skipped": json.dumps(skipped)})
            continue
        read_s = time.perf_counter() - started
        table = pa.concat_tables(table for _, table in tables)
        tokenized = tokenize_rows(table, model_options, query_column, passage_column, select_column)
        timings = {"read_s": read_s, "tokenize_s": time.perf_counter() - started - read_s}
        read = [part for part, _ in tables]
        rows.append(
            {
                **_unit_fields(WorkUnit(*_range(read[0]), tuple(read[1:]))),
                "name": unit["name"],  # the planned unit's name, whatever was left out
                "table": to_ipc(tokenized),
                "skipped": json.dumps(skipped),
                "timings": json.dumps(timings),
            }
        )
    return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)


def read_parts(
    source: Location, unit: WorkUnit, skip_bad_files: bool
) -> tuple[list[tuple[WorkUnit, pa.Table]], dict[str, str]]:
    """Each readable part of the unit with its rows, and the unreadable files with the reason.

    Reading stops at the first bad file unless the unit is packed and ``skip_bad_files`` is set.

    Raises:
        Exception: A transient storage error that survived the retries (the task is retried).
    """
    tables, skipped = [], {}
    for part in unit.parts:
        try:
            reading = functools.partial(read_range, source.fs, part)
            tables.append((part, with_retries(reading, f"reading {part.path}")))
        except Exception as exc:
            if is_transient(exc):
                raise
            skipped[part.path] = f"cannot read Parquet file {part.path}: {_first_line(exc)}"
            if not (skip_bad_files and unit.more_files):
                return [], skipped
    return tables, skipped


class ScoreUnits(ScoreRows):
    """Ray Data callable class: the stage's scorer, one tokenized unit at a time."""

    def __init__(
        self, model_options: ModelOptions, score_column: str, position_column: str | None = None
    ) -> None:
        super().__init__(model_options, score_column)
        self.position_column = position_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Append a float32 score column to each unit's rows (null where there was nothing to score)."""
        return pa.Table.from_pylist([self.score_unit(row) for row in batch.to_pylist()], schema=SCORED_SCHEMA)

    def score_unit(self, row: dict[str, Any]) -> dict[str, Any]:
        """Score one unit row of ``tokenize_units``; an error row passes through."""
        if row["error"] is not None:
            return {**row, "table": None, "counts": None}
        started, started_at = time.perf_counter(), time.time()
        scored, counts = self.score_table(from_ipc(row["table"]))
        skipped = json.loads(row["skipped"])
        if skipped:  # kept in the unit's footer, so a resumed run still reports them
            counts = {**counts, "skipped_files": skipped}
        if self.position_column is not None:
            scored = scored.append_column(self.position_column, input_positions(_unit(row)))
        timings = {
            **json.loads(row["timings"]),
            "forward_s": time.perf_counter() - started,
            "forward_started_at": started_at,
        }
        return {**row, "table": to_ipc(scored), "counts": json.dumps(counts), "timings": json.dumps(timings)}


def commit_units(batch: pa.Table, destination: Location) -> pa.Table:
    """Ray Data task: commit each scored unit as its own output file; returns one manifest row per unit."""
    rows = []
    for row in batch.to_pylist():
        if row["error"] is None:
            started = time.perf_counter()
            commit_table(destination, row["name"], from_ipc(row["table"]), json.loads(row["counts"]))
            timings = {**json.loads(row["timings"]), "write_s": time.perf_counter() - started}
            row["timings"] = json.dumps(timings)
        rows.append({key: row[key] for key in COMMITTED_SCHEMA.names})
    return pa.Table.from_pylist(rows, schema=COMMITTED_SCHEMA)


def stage_seconds(timings: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Seconds spent per step, summed over units, and when the first forward pass started."""
    totals = {
        key: round(sum(t.get(key, 0.0) for t in timings), 3)
        for key in ("read_s", "tokenize_s", "forward_s", "write_s")
    }
    starts = [t["forward_started_at"] for t in timings if "forward_started_at" in t]
    return {**totals, "first_forward_at": min(starts, default=0.0)}


def _unit(row: dict[str, Any]) -> WorkUnit:
    more = tuple(WorkUnit(*part) for part in json.loads(row["more_files"]))
    return WorkUnit(row["file_index"], row["path"], row["row_start"], row["row_stop"], more)


def _range(part: WorkUnit) -> tuple[int, str, int, int]:
    return part.file_index, part.path, part.row_start, part.row_stop


def _unit_fields(unit: WorkUnit) -> dict[str, Any]:
    """A unit's fields as the pipeline's rows carry them."""
    return {key: value for key, value in unit_rows([unit])[0].items() if key not in ("skipped", "timings")}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
