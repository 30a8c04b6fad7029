"""A cascade's later stages in the job: per query the best k of one stage go on to the next.

After stage 1 has scored every unit (``_scored/``), each later stage N runs in two committed steps:

- ``_selectN/``: every row, grouped by query (a Ray Data hash shuffle, one group at a time on a
  worker) and marked ``__rerank_selected`` when it is among its query's best ``rerank_count`` by the
  previous stage's raw score (ties in input order). ``_DONE`` is written when all files are, and
  records what the selection was built from (the previous stage's unit files and their rows) and the
  files it wrote. A rerun keeps the selection only when both are unchanged; otherwise it redoes it,
  and everything after it (this stage's scored units and every later stage), since they were made
  from the old one.
- ``_scoredN/``: the selection's files cut into work units of about ``rows_per_unit`` rows (as stage
  1's input is) through the scoring pipeline with stage N's model (its own actor pool), scoring only
  the marked rows; committed unit by unit, so a rerun after a crash scores only the units not yet
  committed, and never redoes an earlier stage.

The final ranking (``jobs.ranking``) reads the last stage's files: every input row, with the score of
every stage it reached.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data

from jobs.commit import committed_counts, list_names, remove_files, remove_path
from jobs.manifest import read_json, write_json
from jobs.pipeline import UnitScoring, score_units
from jobs.ranking import (
    POSITION_COLUMN,
    SELECTED_COLUMN,
    float_scores,
    rank_partitions,
    ranking_data_context,
)
from jobs.resources import PoolRequest
from jobs.settings import JobSettings, RescoreSettings
from jobs.storage import Location, read_footers
from jobs.units import WorkUnit, plan_units
from reranker.cascade import CascadeStage, model_options, stage_names, top_candidates
from reranker.errors import OutputError
from reranker.loading import pinned_model
from reranker.settings import ModelOptions

logger = logging.getLogger("jobs.rescore")
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
    input_bytes: int,
) -> tuple[Location, list[str], list[dict[str, dict[str, Any]]]]:
    """Stages 2..N after stage 1 wrote ``first`` (its directory and unit files).

    ``num_rows`` and ``input_bytes`` (uncompressed) are the input's: they size the selection's shuffle.

    Returns:
        The last stage's directory and files, and each later stage's committed units' counts.

    Raises:
        OutputError: A file the job wrote itself could not be read back.
    """
    job, stages = settings.job, settings.stages
    columns = stage_score_columns(job.score_column, stages)
    previous, names = first
    source = committed_counts(previous, names)
    stage_counts = []
    for number in range(1, len(stages)):
        selected_at = output.child(f"_select{number + 1}")
        if not selection_is_current(selected_at, source):
            remove_files(output, later_working_dirs(output, number + 1))
            count = stages[number - 1].rerank_count or 0
            column = columns[number - 1]
            select_candidates(previous, names, selected_at, job, column, count, num_rows, input_bytes)
            record_selection(selected_at, source)
        else:
            logger.info("%s is complete; kept", selected_at.path)
        units = selected_units(selected_at, job.rows_per_unit)
        scored_at = output.child(f"_scored{number + 1}")
        committed = list_names(scored_at) & {unit.name for unit in units}
        todo = [unit for unit in units if unit.name not in committed]
        logger.info("stage %d: %d units, %d already committed", number + 1, len(units), len(committed))
        if todo:
            scoring = UnitScoring(
                selected_at, job.query_column, job.passage_column, columns[number], None, SELECTED_COLUMN
            )
            options = raw_scores(pinned_model(model_options(stages[number]), versions[number]))
            sizing = stage_sizing(stages[number], job)
            failed = score_units(todo, scoring, options, job, scored_at, sizing, f"stage {number + 1}")
            if failed:
                raise OutputError(f"cannot read the job's own files: {'; '.join(failed.values())}")
        previous, names = scored_at, [unit.name for unit in units]
        source = committed_counts(scored_at, names)
        stage_counts.append(source)
    return previous, names, stage_counts


def raw_scores(options: ModelOptions) -> ModelOptions:
    """A ranked job's scoring options: raw logits, which ranking and selection use.

    The activation is applied to what is written, by ``jobs.ranking``.
    """
    return options.model_copy(update={"activation": "none"})


def later_working_dirs(output: Location, stage: int) -> list[str]:
    """The working directories of stage ``stage`` and every stage after it (``_selectN``, ``_scoredN``)."""
    names = list_names(output, prefix="_")
    return sorted(name for name in names if (number := _stage_number(name)) is not None and number >= stage)


def _stage_number(name: str) -> int | None:
    for prefix in ("_select", "_scored"):
        suffix = name.removeprefix(prefix)
        if suffix != name and suffix.isdigit():
            return int(suffix)
    return None


def selection_is_current(selected_at: Location, source: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a finished selection was built from these units and still holds every file it wrote."""
    try:
        done = read_json(selected_at, DONE_NAME)
    except ValueError:  # an empty _DONE, as an earlier version wrote it: nothing recorded
        return False
    if not isinstance(done, dict):
        return False
    if done.get("source") != _source_record(source):
        logger.info("%s was built from other units; redoing it and what follows", selected_at.path)
        return False
    return sorted(list_names(selected_at, prefix="") - {DONE_NAME}) == done.get("files")


def record_selection(selected_at: Location, source: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``_DONE``: the units the selection was built from, and the files it wrote."""
    files = sorted(list_names(selected_at, prefix="") - {DONE_NAME})
    write_json(selected_at, DONE_NAME, {"source": _source_record(source), "files": files})


def _source_record(source: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    return [[name, int(counts["rows"])] for name, counts in sorted(source.items())]


def select_candidates(
    previous: Location,
    names: Sequence[str],
    destination: Location,
    job: JobSettings,
    score_column: str,
    count: int,
    num_rows: int,
    input_bytes: int,
) -> None:
    """Write every row of ``previous`` to ``destination``, marking each query's best ``count``.

    The input paths are read as they are: no ``key=value`` directory becomes a column. The shuffle is
    the ranking's (``jobs.ranking.ranking_data_context``), a partition per unit's rows or more.
    """
    remove_path(destination)
    paths = [posixpath.join(previous.path, name) for name in names]
    partitions = rank_partitions(num_rows, input_bytes, job.rows_per_unit)
    with ranking_data_context():
        rows = ray.data.read_parquet(
            paths, filesystem=previous.arrow_filesystem(), num_cpus=job.io_cpus, partitioning=None
        )
        marked = rows.groupby(job.group_column, num_partitions=partitions).map_groups(
            mark_selected,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
            fn_kwargs={"score_column": score_column, "count": count},
            batch_format="pyarrow",
            num_cpus=job.io_cpus,
        )
        marked.write_parquet(  # row groups of a unit's size: the next stage reads no more than its units
            destination.path,
            filesystem=destination.arrow_filesystem(),
            ray_remote_args={"num_cpus": job.io_cpus},
            row_group_size=job.rows_per_unit,
        )


def mark_selected(group: pa.Table, score_column: str, count: int) -> pa.Table:
    """Ray Data group function: one query's rows with ``__rerank_selected`` true for its best ``count``."""
    scores = float_scores(group.column(score_column))
    chosen = top_candidates(scores, count, group.column(POSITION_COLUMN).to_numpy())
    selected = np.zeros(group.num_rows, dtype=bool)
    selected[chosen] = True
    if SELECTED_COLUMN in group.column_names:
        group = group.drop_columns([SELECTED_COLUMN])
    return group.append_column(SELECTED_COLUMN, pa.array(selected))


def selected_units(selected_at: Location, rows_per_unit: int) -> list[WorkUnit]:
    """The selection's files cut into work units of about ``rows_per_unit`` rows, as the input is.

    Files in name order, each footer read once: the same units, with the same names, in every rerun.

    Raises:
        OutputError: A file of the selection can't be read.
    """
    names = sorted(list_names(selected_at, prefix="") - {DONE_NAME})
    paths = [posixpath.join(selected_at.path, name) for name in names]
    footers = read_footers(selected_at, paths)
    unreadable = [str(footer) for footer in footers if isinstance(footer, Exception)]
    if unreadable:
        raise OutputError(f"cannot read the job's own files: {unreadable[0]}")
    return plan_units(paths, [footer.row_groups for footer in footers], rows_per_unit)  # type: ignore[union-attr]
