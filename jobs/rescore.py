"""Rescore Parquet (query, passage) pairs with a cross-encoder on a Ray Data actor pool.

    python -m jobs.rescore --input URI --output URI [--model ID_OR_PATH] [--config FILE] ...

Runs on embedded local Ray, or on a cluster via ``ray job submit --working-dir . -- python -m
jobs.rescore ...``. Ends with one summary line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
import ray.data

from jobs.commit import SKIPPED_NAME, SUCCESS_NAME, TMP_DIR, committed_counts, list_names, remove_files
from jobs.manifest import MANIFEST_NAME, job_manifest, pinned_model, resume_or_start, write_json
from jobs.pipeline import build_pipeline, stage_seconds
from jobs.ranking import POSITION_COLUMN, RANKING_DIR, rank_scored
from jobs.resources import alive_node_resources, object_store_budget, plan_actor_pool
from jobs.settings import JobSettings, RescoreSettings
from jobs.storage import InputPlan, Location, count_rows, inspect_input, prepare_output, write_empty_output
from jobs.units import WorkUnit, plan_units
from reranker.errors import ConfigError, InputError, RerankError
from reranker.loading import check_loadable, model_version
from reranker.settings import parse_flags

logger = logging.getLogger("jobs.rescore")
ACTOR_INIT_DEATHS = 3  # scoring actors that may die while loading before the job fails (Ray's default: 0)
SCORED_DIR = "_scored"


@dataclass(frozen=True)
class JobSummary:
    """What the output holds (from the committed files' footers) and what this run did."""

    rows_read: int
    rows_written: int
    pairs_scored: int
    null_scores: int
    pairs_truncated: int
    units: int
    units_resumed: int
    files_skipped: int
    pairs_scored_this_run: int
    wall_seconds: float

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        seconds = self.wall_seconds
        rate = self.pairs_scored_this_run / seconds if seconds > 0 else 0.0
        return (
            f"rescore: rows read {self.rows_read}, rows written {self.rows_written}, "
            f"pairs scored {self.pairs_scored}, null scores {self.null_scores}, "
            f"pairs truncated {self.pairs_truncated}, units {self.units} ({self.units_resumed} resumed), "
            f"bad files skipped {self.files_skipped}, {rate:.1f} pairs/s, wall {seconds:.1f}s"
        )


def output_schema(input_schema: pa.Schema, job: JobSettings) -> pa.Schema:
    """Input columns, then the float32 score column, then ``rank`` when asked for."""
    schema = input_schema.append(pa.field(job.score_column, pa.float32()))
    return schema.append(pa.field("rank", pa.int32())) if job.rank else schema


def run(settings: RescoreSettings) -> JobSummary:
    """Validate everything on the driver, then score the units not yet committed, and summarize.

    Raises:
        RerankError: A user error (settings, input, output, model, a bad file with
            ``--on-bad-file fail``); nothing was written for it.

    """
    started = time.perf_counter()
    job = settings.job
    if not job.input or not job.output:
        raise ConfigError("both --input and --output are required (or RERANK_INPUT / RERANK_OUTPUT)")
    plan = inspect_input(
        job.input, job.storage_options, _text_columns(job), _new_columns(job), job.on_bad_file == "skip"
    )
    check_loadable(settings.model)  # on the driver: a bad model is one line, not a worker traceback per actor
    version = model_version(settings.model)
    output = prepare_output(job.output, job.storage_options, job.overwrite, resumable=[MANIFEST_NAME])
    done = resume_or_start(output, job_manifest(settings, plan, version), job.output)
    if done is not None:
        logger.info("output %s is already complete; nothing to do", job.output)
        return JobSummary(
            **{**done, "units_resumed": done["units"], "pairs_scored_this_run": 0, "wall_seconds": 0.0}
        )
    units = plan_units(plan.files, [footer.row_groups for footer in plan.footers], job.rows_per_unit)
    scored_at = output.child(SCORED_DIR) if job.group_column else output
    committed = list_names(scored_at) & {unit.name for unit in units}
    todo = [unit for unit in units if unit.name not in committed]
    logger.info("%d units, %d already committed, %d to score", len(units), len(committed), len(todo))
    bad_files = dict(plan.skipped)
    if todo:
        pinned = settings.model_copy(update={"model": pinned_model(settings.model, version)})
        bad_files.update(score_units(todo, plan, pinned, scored_at))
    kept = [unit.name for unit in units if unit.path not in bad_files]
    remove_files(scored_at, [unit.name for unit in units if unit.path in bad_files])
    counts = committed_counts(scored_at, kept)
    if not kept:  # an empty input, or every unit turned out bad: one empty file with the full schema
        write_empty_output(output, output_schema(plan.schema, job))
    elif job.group_column:
        rank_scored(scored_at, kept, output, job, plan.num_rows)
    scored_now = sum(counts[unit.name]["scored"] for unit in todo if unit.name in counts)
    return finish(output, counts, (len(units), len(committed), scored_now), bad_files, started)


def score_units(
    units: list[WorkUnit], plan: InputPlan, settings: RescoreSettings, destination: Location
) -> dict[str, str]:
    """Run the units through the Ray Data pipeline; each is committed as it finishes.

    Returns:
        Input files with a unit that could not be read, and why (``--on-bad-file skip``).

    Raises:
        InputError: A unit could not be read and ``--on-bad-file fail``; names the file.

    """
    pool = plan_actor_pool(alive_node_resources(), settings.job, settings.model.torch_threads)
    budget = object_store_budget(pool, settings.job)
    logger.info("actor pool: %s, object store budget %d MiB", pool, budget // 2**20)
    bad_files: dict[str, str] = {}
    timings: list[dict[str, float]] = []
    with job_data_context(budget):
        pipeline = build_pipeline(units, plan, settings, pool, destination)
        for done, row in enumerate(pipeline.iter_rows(), 1):  # one small manifest row per unit
            if row["error"] is not None:
                if settings.job.on_bad_file == "fail":
                    raise InputError(row["error"] + " (pass --on-bad-file skip to leave bad files out)")
                logger.warning("skipping %s", row["error"])
                bad_files[row["path"]] = row["error"]
                continue
            timings.append(json.loads(row["timings"]))
            logger.info("committed %s (%d/%d)", row["name"], done, len(units))
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


def finish(
    output: Location,
    counts: Mapping[str, Mapping[str, int]],
    units: tuple[int, int, int],
    bad_files: Mapping[str, str],
    started: float,
) -> JobSummary:
    """Write the skipped-files report and ``_SUCCESS``, clear the working directories, summarize.

    Args:
        output: The output directory.
        counts: Each committed unit's counts, from its footer.
        units: Units in the job, units committed by earlier runs, pairs scored by this run.
        bad_files: Input files left out, and why.
        started: ``time.perf_counter()`` at the start of the run.

    """
    num_units, resumed, scored_now = units
    if bad_files:
        report = [{"file": path, "reason": reason} for path, reason in sorted(bad_files.items())]
        write_json(output, SKIPPED_NAME, {"skipped_files": report})
    total = {
        key: sum(unit[key] for unit in counts.values()) for key in ("rows", "scored", "null", "truncated")
    }
    summary = JobSummary(
        rows_read=total["rows"],
        rows_written=count_rows(output),
        pairs_scored=total["scored"],
        null_scores=total["null"],
        pairs_truncated=total["truncated"],
        units=num_units,
        units_resumed=resumed,
        files_skipped=len(bad_files),
        pairs_scored_this_run=scored_now,
        wall_seconds=time.perf_counter() - started,
    )
    for name in (TMP_DIR, SCORED_DIR, RANKING_DIR):  # first: a crash before _SUCCESS leaves no copy behind
        working = output.child(name)
        if working.fs.exists(working.path):
            working.fs.rm(working.path, recursive=True)
    write_json(output, SUCCESS_NAME, dataclasses.asdict(summary))
    return summary


def _text_columns(job: JobSettings) -> list[str]:
    return [job.query_column, job.passage_column]


def _new_columns(job: JobSettings) -> list[str]:
    return [
        job.score_column,
        *(["rank"] if job.rank else []),
        *([POSITION_COLUMN] if job.group_column else []),
    ]


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The flags given (one per setting, see ``--help``): keyword overrides for ``RescoreSettings.load``."""
    return parse_flags(
        RescoreSettings, argv, prog="python -m jobs.rescore", description=__doc__.splitlines()[0]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; a user error prints one line and returns 2."""
    try:
        settings = RescoreSettings.load(**parse_args(argv))
        summary = run(settings)
    except RerankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        print(f"error: scoring failed: {type(cause).__name__}: {cause}".splitlines()[0], file=sys.stderr)
        return 1
    print(summary.line())
    return 0


def cli() -> None:
    """Process entry point: configure logging, run, exit with main()'s code.

    Logging is the process's to configure, not main()'s: tests call main() in-process.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    sys.exit(main())


if __name__ == "__main__":
    cli()
