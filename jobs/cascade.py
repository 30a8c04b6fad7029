"""A cascade's later stages in the job: per query the best k of one stage go on to the next.

After stage 1 has scored every unit (``_scored/``), each later stage N runs in two committed steps:

- ``_selectN/``: every row, grouped by query (a Ray Data hash shuffle, one group at a time on a
  worker) and marked ``__rerank_selected`` when it is among its query's best ``rerank_count`` by the
  previous stage (ties in input order). ``_DONE`` is written when all files are; a rerun without it
  redoes the step, one with it keeps the files, so the units below keep their names.
- ``_scoredN/``: the selected files as work units through the scoring pipeline with stage N's model
  (its own actor pool), scoring only the marked rows; committed unit by unit, so a rerun after a
  crash scores only the units not yet committed, and never redoes an earlier stage.

The final ranking (``jobs.ranking``) reads the last stage's files: every input row, with the score of
every stage it reached.
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from jobs.commit import committed_counts, list_names
from jobs.manifest import pinned_model
from jobs.pipeline import UnitScoring, score_units
from jobs.ranking import MAX_RANK_PARTITIONS, POSITION_COLUMN, float_scores
from jobs.resources import PoolRequest
from jobs.settings import JobSettings, RescoreSettings
from jobs.storage import Location
from jobs.units import WorkUnit
from reranker.cascade import CascadeStage, model_options, stage_names, top_candidates
from reranker.errors import OutputError

logger = logging.getLogger("jobs.rescore")
SELECTED_COLUMN = "__rerank_selected"
DONE_NAME = "_DONE"


def stage_score_columns(score_column: str, stages: Sequence[CascadeStage]) -> list[str]:
    """Each stage's score column: ``<score_column>_<stage name>`` (``score_stage1``, ...)."""
    return [f"{score_column}_{name}" for name in stage_names(stages)]


def stage_sizing(stage: CascadeStage, job: JobSettings) -> PoolRequest:
    """A stage's actor pool: the stage's own CPUs and GPUs per actor where given, else the job's."""
    return PoolRequest(
        num_actors=job.num_actors,
        cpus_per_actor=stage.cpus if stage.cpus is not None else job.cpus_per_actor,
        gpus_per_actor=stage.gpus if stage.gpus is not None else job.gpus_per_actor,
        io_cpus=job.io_cpus,
    )


def run_later_stages(
    settings: RescoreSettings,
    versions: Sequence[str],
    first: tuple[Location, list[str]],
    output: Location,
    num_rows: int,
) -> tuple[Location, list[str], list[int]]:
    """Stages 2..N after stage 1 wrote ``first`` (its directory and unit files).

    Returns:
        The last stage's directory and files, and the pairs each later stage scored (committed).

    Raises:
        OutputError: A file the job wrote itself could not be read back.
    """
    job, stages = settings.job, settings.stages
    columns = stage_score_columns(job.score_column, stages)
    (previous, names), scored_pairs = first, []
    for number in range(1, len(stages)):
        selected_at = output.child(f"_select{number + 1}")
        count = stages[number - 1].rerank_count or 0
        select_candidates(previous, names, selected_at, job, columns[number - 1], count, num_rows)
        units = selected_units(selected_at)
        scored_at = output.child(f"_scored{number + 1}")
        committed = list_names(scored_at) & {unit.name for unit in units}
        todo = [unit for unit in units if unit.name not in committed]
        logger.info("stage %d: %d units, %d already committed", number + 1, len(units), len(committed))
        if todo:
            scoring = UnitScoring(
                selected_at, job.query_column, job.passage_column, columns[number], None, SELECTED_COLUMN
            )
            options = pinned_model(model_options(stages[number]), versions[number])
            failed = score_units(todo, scoring, options, job, scored_at, stage_sizing(stages[number], job))
            if failed:
                raise OutputError(f"cannot read the job's own files: {'; '.join(failed.values())}")
        previous, names = scored_at, [unit.name for unit in units]
        counts = committed_counts(scored_at, names)
        scored_pairs.append(sum(unit["scored"] for unit in counts.values()))
    return previous, names, scored_pairs


def select_candidates(
    previous: Location,
    names: Sequence[str],
    destination: Location,
    job: JobSettings,
    score_column: str,
    count: int,
    num_rows: int,
) -> None:
    """Write every row of ``previous`` to ``destination``, marking each query's best ``count``.

    In about ``rows_per_unit`` rows per file: the next stage's work units.
    """
    if destination.fs.exists(posixpath.join(destination.path, DONE_NAME)):
        logger.info("%s is complete; kept", destination.path)
        return
    if destination.fs.exists(destination.path):
        destination.fs.rm(destination.path, recursive=True)
    paths = [posixpath.join(previous.path, name) for name in names]
    rows = ray.data.read_parquet(paths, filesystem=previous.arrow_filesystem(), num_cpus=job.io_cpus)
    partitions = max(1, min(MAX_RANK_PARTITIONS, math.ceil(num_rows / job.rows_per_unit)))
    marked = rows.groupby(job.group_column, num_partitions=partitions).map_groups(
        mark_selected,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={"score_column": score_column, "count": count},
        batch_format="pyarrow",
        num_cpus=job.io_cpus,
    )
    marked.write_parquet(
        destination.path, filesystem=destination.arrow_filesystem(), ray_remote_args={"num_cpus": job.io_cpus}
    )
    destination.fs.pipe_file(posixpath.join(destination.path, DONE_NAME), b"")


def mark_selected(group: pa.Table, score_column: str, count: int) -> pa.Table:
    """Ray Data group function: one query's rows with ``__rerank_selected`` true for its best ``count``."""
    scores = float_scores(group.column(score_column))
    chosen = top_candidates(scores, count, group.column(POSITION_COLUMN).to_numpy())
    selected = np.zeros(group.num_rows, dtype=bool)
    selected[chosen] = True
    if SELECTED_COLUMN in group.column_names:
        group = group.drop_columns([SELECTED_COLUMN])
    return group.append_column(SELECTED_COLUMN, pa.array(selected))


def selected_units(selected_at: Location) -> list[WorkUnit]:
    """One work unit per file of a selection step, in name order (the same in every rerun)."""
    names = sorted(list_names(selected_at, prefix="") - {DONE_NAME})
    units = []
    for index, name in enumerate(names):
        path = posixpath.join(selected_at.path, name)
        with selected_at.fs.open(path, "rb") as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
        units.append(WorkUnit(index, path, 0, rows))
    return units
