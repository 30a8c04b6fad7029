"""Per-query ranking of a scored job: best first, ties in input order, ranks and top-k.

The job's last phase when ``--group-column`` is set: the scored units are grouped by query (a Ray
Data hash shuffle) and each group is sorted by score, then by the row's place in the input; a
cascade's groups by the stages each row reached first (``reranker.cascade``).
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from jobs.commit import list_names, remove_files
from jobs.settings import JobSettings
from jobs.storage import Location
from jobs.units import WorkUnit
from reranker.cascade import cascade_order

ROWS_PER_RANK_PARTITION = 100_000
MAX_RANK_PARTITIONS = 200
POSITION_COLUMN = "__rerank_position__"  # a ranked job's tie-breaker: the row's place in the input
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
) -> pa.Table:
    """Ray Data group function: one query's rows best first (null scores last), ranked, cut to k.

    Equal scores keep their input order (``position_column``, dropped from the result), so every
    run, and the redo of a run, keeps and ranks the same rows. With ``stage_columns`` (a cascade's
    per-stage scores), rows that reached a later stage come first and ``score_column`` is added: the
    score of the last stage each row reached (``reranker.cascade.cascade_order``).
    """
    if stage_columns:
        ordered = _cascade_ordered(group, score_column, position_column, stage_columns)
    else:
        ordered = group.sort_by([(score_column, "descending"), (position_column, "ascending")])
    ordered = ordered.drop_columns([name for name in ordered.column_names if name.startswith("__rerank")])
    if top_k is not None:
        ordered = ordered.slice(0, top_k)
    if not add_rank:
        return ordered
    ranks = pa.array(np.arange(1, ordered.num_rows + 1, dtype=np.int32))
    return ordered.append_column("rank", pc.if_else(ordered.column(score_column).is_valid(), ranks, None))


def _cascade_ordered(
    group: pa.Table, score_column: str, position_column: str, stage_columns: Sequence[str]
) -> pa.Table:
    stage_scores = [float_scores(group.column(name)) for name in stage_columns]
    positions = group.column(position_column).to_numpy()
    order, final, _ = cascade_order(stage_scores, positions)
    scores = pa.array(final[order].astype(np.float32), mask=np.isnan(final[order]))
    return group.take(pa.array(order)).append_column(score_column, scores)


def float_scores(column: pa.ChunkedArray) -> np.ndarray:
    """A score column as float64, NaN where null."""
    return np.asarray(pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(), dtype=np.float64)


def rank_scored(
    scored_at: Location,
    names: Sequence[str],
    output: Location,
    job: JobSettings,
    num_rows: int,
    stage_columns: Sequence[str] = (),
) -> None:
    """Last phase of a ranked job: rank each query's rows and write the final files.

    Redone whole on a resume (scoring is what is expensive): files are written to a staging
    directory and moved into the output; ``_SUCCESS`` marks the end. A cascade ranks by its stages.
    """
    remove_files(output, [name for name in list_names(output, prefix="") if not name.startswith("_")])
    staging = output.child(RANKING_DIR)
    if staging.fs.exists(staging.path):
        staging.fs.rm(staging.path, recursive=True)
    paths = [posixpath.join(scored_at.path, name) for name in names]
    scored = ray.data.read_parquet(paths, filesystem=scored_at.arrow_filesystem(), num_cpus=job.io_cpus)
    ranked = scored.groupby(job.group_column, num_partitions=rank_partitions(num_rows)).map_groups(
        rank_group,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={
            "score_column": job.score_column,
            "position_column": POSITION_COLUMN,
            "add_rank": job.rank or bool(stage_columns),
            "top_k": job.top_k,
            "stage_columns": list(stage_columns),
        },
        batch_format="pyarrow",
        num_cpus=job.io_cpus,
    )
    ranked.write_parquet(
        staging.path, filesystem=staging.arrow_filesystem(), ray_remote_args={"num_cpus": job.io_cpus}
    )
    for path in staging.fs.find(staging.path):
        staging.fs.mv(path, posixpath.join(output.path, posixpath.basename(path)))


def rank_partitions(num_rows: int) -> int:
    """Hash partitions for the per-query ranking: one per ``ROWS_PER_RANK_PARTITION`` rows, at most 200.

    Ray Data's default is always 200, which makes a small job run 200 reduce tasks.
    """
    return max(1, min(MAX_RANK_PARTITIONS, math.ceil(num_rows / ROWS_PER_RANK_PARTITION)))
