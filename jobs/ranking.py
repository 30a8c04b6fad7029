"""Per-query ranking of a scored job: best first, ties in input order, ranks and top-k.

The job's last phase when ``--group-column`` is set: the scored units are grouped by query (a Ray
Data hash shuffle) and each group is sorted by score, then by the row's place in the input; a
cascade's groups by the stages each row reached first (``reranker.cascade``). The scored units hold
raw logits: the order is decided on them, and the activation (``--activation sigmoid``) is applied
only to the scores written. Each ranked block is committed as one file by a task that reports its
rows, and the rows ``--top-k`` cut, so the driver can check that no row went missing.

The shuffle holds bounded bytes per Ray worker whatever the job's size (``ranking_data_context``,
``rank_partitions``): Ray Data's object-store shuffle (``SHUFFLE_V2``), map tasks of at most
``RANK_MAP_BATCH_BYTES`` of input, and enough partitions that none holds more than
``RANK_PARTITION_BYTES`` of rows (a reduce task holds its whole partition, and 3-4x that while it
sorts and ranks). Shards wait in the object store, which spills to disk. Measured: ``bench.rank_shuffle``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.context import ShuffleStrategy

from jobs.commit import commit_table, list_names, remove_files, remove_path
from jobs.settings import JobSettings
from jobs.storage import Location, parallel_map, storage_call
from jobs.units import WorkUnit
from reranker.cascade import cascade_order, monotone_scores
from reranker.scores import sigmoid
from reranker.types import Activation

ROWS_PER_RANK_PARTITION = 100_000
MAX_RANK_PARTITIONS = 200  # partitions by row count alone (more only to keep each under RANK_PARTITION_BYTES)
RANK_PARTITION_BYTES = 256 * 2**20  # scored rows (Arrow bytes) a reduce task may hold: 3-4x that at its peak
RANK_MAP_BATCH_BYTES = 256 * 2**20  # input a map task partitions at once, ~2x that at its peak (Ray: 1 GiB)
SCORED_ROW_EXTRA_BYTES = 16  # what scoring adds to an input row: its position (int64), float32 scores
POSITION_COLUMN = "__rerank_position__"  # a ranked job's tie-breaker: the row's place in the input
SELECTED_COLUMN = "__rerank_selected"  # a cascade's rows chosen for the next stage (jobs.cascade)
CUT_COLUMN = "__rerank_cut"  # on a group's first ranked row: the rows --top-k left out of the group
HIDDEN_COLUMNS = (POSITION_COLUMN, SELECTED_COLUMN, CUT_COLUMN)  # between the job's steps, never written
_ROWS_PER_FILE_BITS = 40  # position = file index * 2**40 + row in the file
RANKING_DIR = "_ranking"


def input_positions(unit: WorkUnit) -> pa.Array:
    """Each row's place in the whole input (file order, then row order), as int64."""
    ranges = [
        np.arange(part.row_start, part.row_stop, dtype=np.int64) + (part.file_index << _ROWS_PER_FILE_BITS)
        for part in unit.parts
    ]
    return pa.array(np.concatenate(ranges))


def rank_group(
    group: pa.Table,
    score_column: str,
    position_column: str,
    add_rank: bool,
    top_k: int | None,
    stage_columns: Sequence[str] = (),
    activation: Activation = "none",
) -> pa.Table:
    """Ray Data group function: one query's rows best first (null scores last), ranked, cut to k.

    Equal scores keep their input order (``position_column``, kept for ``commit_ranked``, which
    names the block's file by it and drops it), so every run, and the redo of a run, keeps and ranks
    the same rows. With ``stage_columns`` (a cascade's
    per-stage scores), rows that reached a later stage come first and ``score_column`` is added: the
    score of the last stage each row reached, made monotone with the order
    (``reranker.cascade.monotone_scores``). The scores are raw logits until the order is decided;
    ``activation`` then applies to every score column written. ``CUT_COLUMN`` counts what k left out.
    """
    if stage_columns:
        ordered = _cascade_ordered(group, score_column, position_column, stage_columns)
    else:
        ordered = group.sort_by([(score_column, "descending"), (position_column, "ascending")])
    if SELECTED_COLUMN in ordered.column_names:
        ordered = ordered.drop_columns([SELECTED_COLUMN])
    cut = 0 if top_k is None else max(0, ordered.num_rows - top_k)
    ordered = ordered.slice(0, top_k) if top_k is not None else ordered
    if activation == "sigmoid":
        for name in [*stage_columns, score_column]:
            ordered = _with_sigmoid(ordered, name)
    if add_rank:
        ranks = pa.array(np.arange(1, ordered.num_rows + 1, dtype=np.int32))
        ordered = ordered.append_column(
            "rank", pc.if_else(ordered.column(score_column).is_valid(), ranks, None)
        )
    cuts = np.zeros(ordered.num_rows, dtype=np.int64)
    cuts[:1] = cut
    return ordered.append_column(CUT_COLUMN, pa.array(cuts))


def _with_sigmoid(table: pa.Table, name: str) -> pa.Table:
    """``table`` with the raw logits of column ``name`` replaced by their sigmoid (float32, nulls kept)."""
    logits = float_scores(table.column(name))
    values = pa.array(sigmoid(logits).astype(np.float32), mask=np.isnan(logits))
    return table.set_column(table.schema.get_field_index(name), name, values)


def _cascade_ordered(
    group: pa.Table, score_column: str, position_column: str, stage_columns: Sequence[str]
) -> pa.Table:
    stage_scores = [float_scores(group.column(name)) for name in stage_columns]
    positions = group.column(position_column).to_numpy()
    order, final, reached = cascade_order(stage_scores, positions)
    reported = monotone_scores(order, final, reached)[order]
    scores = pa.array(reported.astype(np.float32), mask=np.isnan(reported))
    return group.take(pa.array(order)).append_column(score_column, scores)


def float_scores(column: pa.ChunkedArray) -> np.ndarray:
    """A score column as float64, NaN where null."""
    return np.asarray(pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(), dtype=np.float64)


@dataclass(frozen=True)
class RankedRows:
    """What the ranking wrote: rows in its files, and rows ``--top-k`` left out."""

    written: int
    cut: int


def rank_scored(
    scored_at: Location,
    names: Sequence[str],
    output: Location,
    job: JobSettings,
    num_rows: int,
    input_bytes: int,
    stage_columns: Sequence[str] = (),
    activation: Activation = "none",
) -> RankedRows:
    """Last phase of a ranked job: rank each query's rows and write the final files.

    Redone whole on a resume (scoring is what is expensive): files are committed to a staging
    directory and moved into the output; ``_SUCCESS`` marks the end. A cascade ranks by its stages.
    The input paths are read as they are: no ``key=value`` directory becomes a column.
    ``input_bytes`` (the input's uncompressed bytes) sizes the partitions (``rank_partitions``).
    """
    remove_files(output, [name for name in list_names(output, prefix="") if not name.startswith("_")])
    staging = output.child(RANKING_DIR)
    remove_path(staging)
    with ranking_data_context():
        written, cut = _rank_and_commit(
            scored_at, names, staging, job, rank_partitions(num_rows, input_bytes), stage_columns, activation
        )
    move_files(staging, output)
    return RankedRows(written, cut)


def _rank_and_commit(
    scored_at: Location,
    names: Sequence[str],
    staging: Location,
    job: JobSettings,
    partitions: int,
    stage_columns: Sequence[str],
    activation: Activation,
) -> tuple[int, int]:
    """Group the scored units by query, rank each group, commit each ranked block; rows written and cut."""
    paths = [posixpath.join(scored_at.path, name) for name in names]
    scored = ray.data.read_parquet(
        paths, filesystem=scored_at.arrow_filesystem(), num_cpus=job.io_cpus, partitioning=None
    )
    ranked = scored.groupby(job.group_column, num_partitions=partitions).map_groups(
        rank_group,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={
            "score_column": job.score_column,
            "position_column": POSITION_COLUMN,
            "add_rank": job.rank or bool(stage_columns),
            "top_k": job.top_k,
            "stage_columns": list(stage_columns),
            "activation": activation,
        },
        batch_format="pyarrow",
        num_cpus=job.io_cpus,
    )
    committed = ranked.map_batches(
        commit_ranked,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={"destination": staging},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=job.io_cpus,
    )
    written = cut = 0
    for row in committed.iter_rows():
        written, cut = written + row["rows"], cut + row["cut"]
    return written, cut


def move_files(source: Location, destination: Location) -> None:
    """Move the visible files directly under ``source`` into ``destination`` (same filesystem)."""

    def move(name: str) -> None:
        path = posixpath.join(source.path, name)
        target = posixpath.join(destination.path, name)
        storage_call(functools.partial(source.fs.mv, path, target), f"moving {path}")

    names = [name for name in sorted(list_names(source, prefix="")) if not name.startswith(("_", "."))]
    parallel_map(move, names, source.concurrency)


def commit_ranked(batch: pa.Table, destination: Location) -> pa.Table:
    """Ray Data task: commit one block of ranked rows as its own file; returns its rows and rows cut.

    The file is named by the block's first input position, so a retried task rewrites its own file
    rather than adding a second copy.
    """
    cut = int(pc.sum(batch.column(CUT_COLUMN)).as_py() or 0) if CUT_COLUMN in batch.column_names else 0
    table = batch.drop_columns([name for name in HIDDEN_COLUMNS if name in batch.column_names])
    if table.num_rows:
        first = int(pc.min(batch.column(POSITION_COLUMN)).as_py())
        commit_table(destination, f"part-{first:016x}.parquet", table, {"rows": table.num_rows})
    return pa.table({"rows": [table.num_rows], "cut": [cut]})


def rank_partitions(
    num_rows: int, input_bytes: int = 0, rows_per_partition: int = ROWS_PER_RANK_PARTITION
) -> int:
    """Hash partitions for a per-query shuffle: one per ``rows_per_partition`` rows, at most 200, or more.

    More keep each partition under ``RANK_PARTITION_BYTES`` of scored rows: a reduce task holds its
    whole partition, so a fixed count would let its memory grow with the job. ``input_bytes`` is the
    input's uncompressed size (Parquet footers: a row's Arrow size to within about 10%); scoring adds
    ``SCORED_ROW_EXTRA_BYTES`` a row. Ray Data's default is always 200 partitions, which makes a small
    job run 200 reduce tasks.
    """
    by_rows = max(1, min(MAX_RANK_PARTITIONS, math.ceil(num_rows / rows_per_partition)))
    scored_bytes = input_bytes + num_rows * SCORED_ROW_EXTRA_BYTES
    return max(by_rows, math.ceil(scored_bytes / RANK_PARTITION_BYTES))


@contextlib.contextmanager
def ranking_data_context() -> Iterator[None]:
    """Ray Data's settings for a per-query shuffle, restored afterwards (the context is the process's).

    ``SHUFFLE_V2``: map tasks partition their input into shards in the object store (spilled to
    disk when full), and one reduce task per partition ranks it; Ray's ``HASH_SHUFFLE`` would hold
    every row in the heaps of its aggregator actors, one per CPU. Map tasks take at most
    ``RANK_MAP_BATCH_BYTES`` of input each (Ray's default, 1 GiB, peaks past 2 GiB).
    """
    context = ray.data.DataContext.get_current()
    saved = (context.shuffle_strategy, context.shuffle_input_batch_bytes)
    context.shuffle_strategy = ShuffleStrategy.SHUFFLE_V2
    context.shuffle_input_batch_bytes = RANK_MAP_BATCH_BYTES
    try:
        yield
    finally:
        context.shuffle_strategy, context.shuffle_input_batch_bytes = saved
