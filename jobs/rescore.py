"""Rescore Parquet (query, passage) pairs with a cross-encoder on a Ray Data actor pool.

    python -m jobs.rescore --input URI --output URI [--model ID_OR_PATH] [--config FILE] ...

Runs on embedded local Ray, or on a cluster via ``ray job submit --working-dir . -- python -m
jobs.rescore ...``. Ends with one summary line.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
import ray.data
from ray.data.exceptions import ExecutionTimeoutError

from jobs.cascade import raw_scores, run_later_stages, stage_score_columns, stage_sizing
from jobs.cluster import cluster_shape, start_ray
from jobs.commit import (
    SKIPPED_NAME,
    SUCCESS_NAME,
    TMP_DIR,
    WRITTEN_NAME,
    committed_counts,
    list_names,
    remove_files,
)
from jobs.manifest import (
    MANIFEST_NAME,
    changed_fields,
    job_manifest,
    read_json,
    resume_or_start,
    write_json,
)
from jobs.pipeline import UnitScoring, score_units
from jobs.ranking import HIDDEN_COLUMNS, POSITION_COLUMN, RANKING_DIR, rank_scored
from jobs.resources import plan_actor_pool
from jobs.retries import is_transient
from jobs.settings import JobSettings, RescoreSettings
from jobs.storage import (
    InputPlan,
    Location,
    check_output_apart,
    count_rows,
    exists,
    inspect_input,
    locate,
    prepare_output,
    storage_call,
    write_empty_output,
)
from jobs.units import WorkUnit, plan_units
from reranker.cascade import CascadeStage, model_options, warn_if_costlier_first
from reranker.errors import ConfigError, OutputError, RerankError
from reranker.loading import check_loadable, model_version, pair_cost, pinned_model
from reranker.settings import parse_flags

logger = logging.getLogger("jobs.rescore")
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
    stage_pairs_scored: list[int] = field(default_factory=list)  # a cascade's pairs scored per stage

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        seconds = self.wall_seconds
        rate = self.pairs_scored_this_run / seconds if seconds > 0 else 0.0
        stages = "/".join(map(str, self.stage_pairs_scored))
        return (
            f"rescore: rows read {self.rows_read}, rows written {self.rows_written}, "
            f"pairs scored {self.pairs_scored}, null scores {self.null_scores}, "
            f"pairs truncated {self.pairs_truncated}, units {self.units} ({self.units_resumed} resumed), "
            f"bad files skipped {self.files_skipped}, {rate:.1f} pairs/s, wall {seconds:.1f}s"
            + (f", pairs per stage {stages}" if stages else "")
        )


def output_schema(input_schema: pa.Schema, settings: RescoreSettings) -> pa.Schema:
    """Input columns, then each cascade stage's score, the float32 score column, ``rank`` when asked for."""
    stage_columns = _stage_columns(settings)
    for name in [*stage_columns, settings.job.score_column]:
        input_schema = input_schema.append(pa.field(name, pa.float32()))
    return input_schema.append(pa.field("rank", pa.int32())) if settings.adds_rank else input_schema


def run(settings: RescoreSettings) -> JobSummary:
    """Validate everything on the driver, then score the units not yet committed, and summarize.

    Raises:
        RerankError: A user error (settings, input, output, model, a bad file with
            ``--on-bad-file fail``); nothing was written for it.
        RowsLostError: The rows written are not the rows read less the skipped files' rows.

    """
    started = time.perf_counter()
    job = settings.job
    plan, versions = checked_plan(settings)
    uri = job.output or ""  # checked_plan refused a missing one
    output = prepare_output(uri, job.storage_options, job.overwrite, resumable=[MANIFEST_NAME])
    done = resume_or_start(output, job_manifest(settings, plan, versions), uri)
    if done is not None:
        logger.info("output %s is already complete; nothing to do", job.output)
        remove_files(output, [WRITTEN_NAME])  # a run that died right after writing _SUCCESS
        return JobSummary(
            **{**done, "units_resumed": done["units"], "pairs_scored_this_run": 0, "wall_seconds": 0.0}
        )
    written = read_json(output, WRITTEN_NAME)
    if written is not None:  # a run wrote every file and died while clearing its working directories
        logger.info("output %s is written; finishing its cleanup", job.output)
        summary = JobSummary(**{**written, "units_resumed": written["units"], "pairs_scored_this_run": 0})
        complete(output, summary)
        return summary
    return rescore(settings, plan, versions, output, started)


def checked_plan(settings: RescoreSettings) -> tuple[InputPlan, list[str]]:
    """The input's files and footers and each stage's model version, all checked on the driver (Ray up).

    Raises:
        RerankError: A user error (settings, input, output, model), before anything is written.
    """
    job = settings.job
    if not job.input or not job.output:
        raise ConfigError("both --input and --output are required (or RERANK_INPUT / RERANK_OUTPUT)")
    plan = inspect_input(
        job.input, job.storage_options, _text_columns(job), _new_columns(settings), job.on_bad_file == "skip"
    )
    check_output_apart(plan, job.input, job.output, job.storage_options)
    return plan, checked_while_ray_starts(settings.stages)


def dry_run(settings: RescoreSettings) -> str:
    """What a run would do, checked as a run checks it: nothing is scored, written or deleted.

    Raises:
        RerankError: A user error, as ``run`` would raise it.
    """
    plan, versions = checked_plan(settings)
    job = settings.job
    units = plan_units(plan.files, [footer.row_groups for footer in plan.footers], job.rows_per_unit)
    output = locate(job.output or "", job.storage_options)
    state = _output_state(settings, plan, versions, output)
    lines = [
        f"input: {job.input}: {len(plan.files):,} files, {plan.num_rows:,} rows"
        + (f", {len(plan.skipped)} bad files skipped" if plan.skipped else ""),
        f"output: {job.output}: {state}",
    ]
    committed = _committed(state, settings, output, units)
    lines.append(
        f"units: {len(units):,} of up to {job.rows_per_unit:,} rows; {len(committed):,} committed "
        f"(resumed), {len(units) - len(committed):,} to score"
    )
    cluster = cluster_shape(job.cluster_config)
    for number, (stage, version) in enumerate(zip(settings.stages, versions, strict=True)):
        pool = plan_actor_pool(cluster, stage_sizing(stage, job), stage.torch_threads)
        k = f", passes {stage.rerank_count} per query on" if stage.rerank_count else ""
        lines.append(f"stage {number + 1}: {stage.model} ({version}){k}; actor pool {pool}")
    return "\n".join(lines)


def _output_state(settings: RescoreSettings, plan: InputPlan, versions: list[str], output: Location) -> str:
    """What a run would do with the output: new, resumed, complete, replaced, or refused (and why).

    Raises:
        OutputError: The output is a file (a run refuses it the same way).
    """
    job = settings.job
    if not exists(output):
        return "new"
    if storage_call(lambda: output.fs.isfile(output.path), f"checking {job.output}"):
        raise OutputError(f"output {job.output} is a file; give a directory for the Parquet dataset")
    if job.overwrite:
        return "replaced (--overwrite)"
    previous = read_json(output, MANIFEST_NAME)
    if previous is None:
        entries = storage_call(lambda: output.fs.ls(output.path, detail=False), f"listing {job.output}")
        return "holds other data: a run refuses it without --overwrite" if entries else "new"
    changes = changed_fields(previous, job_manifest(settings, plan, versions))
    if changes:
        return f"made by other settings ({'; '.join(changes[:3])}): a run refuses it without --overwrite"
    return "complete: a run does nothing" if read_json(output, SUCCESS_NAME) else "resumes the earlier run"


def _committed(
    state: str, settings: RescoreSettings, output: Location, units: Sequence[WorkUnit]
) -> set[str]:
    """Units an earlier run committed that a run would keep (none unless it resumes or is complete)."""
    if not state.startswith(("resumes", "complete")):
        return set()
    scored_at = output.child(SCORED_DIR) if settings.job.group_column else output
    return list_names(scored_at) & {unit.name for unit in units} if exists(scored_at) else set()


def rescore(
    settings: RescoreSettings, plan: InputPlan, versions: list[str], output: Location, started: float
) -> JobSummary:
    """Score what is not yet committed, rank (and run a cascade's later stages), check, summarize."""
    job = settings.job
    units = plan_units(plan.files, [footer.row_groups for footer in plan.footers], job.rows_per_unit)
    scored_at = output.child(SCORED_DIR) if job.group_column else output
    committed = list_names(scored_at) & {unit.name for unit in units}
    todo = [unit for unit in units if unit.name not in committed]
    logger.info("%d units, %d already committed, %d to score", len(units), len(committed), len(todo))
    bad_files = dict(plan.skipped)
    if todo:
        bad_files.update(score_first_stage(todo, plan, settings, versions[0], scored_at))
    kept, dropped = kept_units(units, list_names(scored_at), bad_files)
    remove_files(scored_at, dropped)
    counts = committed_counts(scored_at, kept)
    for unit_counts in counts.values():  # packed files left out, by this run or an earlier one
        bad_files.update(unit_counts.get("skipped_files", {}))
    expected = expected_rows(plan, bad_files)
    check_rows(_rows_in(counts), expected, "the scored units")
    later: list[int] = []
    to_write = expected
    if not kept:  # an empty input, or every unit turned out bad: one empty file with the full schema
        write_empty_output(output, output_schema(plan.schema, settings))
    elif job.group_column:
        to_write, later = rank_and_write(settings, versions, (scored_at, kept), output, plan, expected)
    scored_now = sum(counts[unit.name]["scored"] for unit in todo if unit.name in counts)
    progress = (len(units), len(committed), scored_now)
    return finish(output, counts, progress, bad_files, started, later, to_write)


def rank_and_write(
    settings: RescoreSettings,
    versions: list[str],
    first: tuple[Location, list[str]],
    output: Location,
    plan: InputPlan,
    expected: int,
) -> tuple[int, list[int]]:
    """A ranked job's last phases: a cascade's later stages, then the per-query ranking.

    Returns:
        The rows the output must hold, and the pairs each later cascade stage scored.

    Raises:
        RowsLostError: A stage's units, or the ranking, do not account for every expected row.
    """
    job = settings.job
    (last_at, last_names), later = first, []
    if settings.cascade.cascade:
        last_at, last_names, stage_counts = run_later_stages(
            settings, versions, first, output, plan.num_rows, plan.num_bytes
        )
        for number, counts in enumerate(stage_counts, 2):
            check_rows(_rows_in(counts), expected, f"stage {number}'s scored units")
        later = [sum(unit["scored"] for unit in counts.values()) for counts in stage_counts]
    activation = settings.stages[-1].activation
    ranked = rank_scored(
        last_at, last_names, output, job, plan.num_rows, plan.num_bytes, _stage_columns(settings), activation
    )
    check_rows(
        ranked.written + ranked.cut, expected, "the ranked rows (written, plus those --top-k left out)"
    )
    return ranked.written, later


class RowsLostError(OutputError):
    """The rows a step holds are not the rows read less the skipped files' rows: never marked a success."""

    error_type = "rows_lost"


def expected_rows(plan: InputPlan, bad_files: Mapping[str, str]) -> int:
    """Rows the job must account for: every input row, less the rows of the files it left out."""
    rows = {path: footer.num_rows for path, footer in zip(plan.files, plan.footers, strict=True)}
    return plan.num_rows - sum(rows.get(path, 0) for path in bad_files)


def check_rows(actual: int, expected: int, what: str) -> None:
    """Fail loudly when a step of the job does not hold the rows it must.

    Raises:
        RowsLostError: ``actual`` differs from ``expected``; nothing is marked complete.
    """
    if actual != expected:
        raise RowsLostError(
            f"{what} hold {actual} rows where {expected} were expected (rows read, less those in skipped "
            "files); the output is not marked complete: rerun the job, or with --overwrite to start afresh"
        )


def _rows_in(counts: Mapping[str, Mapping[str, Any]]) -> int:
    return sum(int(unit["rows"]) for unit in counts.values())


def kept_units(
    units: Sequence[WorkUnit], committed: set[str], bad_files: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """The units whose output stays, and the committed ones to delete.

    A unit stays when it was committed, unless it is a range of a file that turned out bad in
    another unit (a bad file is left out whole); a packed unit left out its bad files itself.
    """
    kept: list[str] = []
    dropped: list[str] = []
    for unit in units:
        whole_file_bad = not unit.more_files and unit.path in bad_files
        (dropped if whole_file_bad or unit.name not in committed else kept).append(unit.name)
    return kept, dropped


def check_stages(stages: Sequence[CascadeStage]) -> list[str]:
    """Check each stage's model on the driver (a bad model is one line, not a traceback per actor).

    Returns:
        Each stage's model version, for the manifest and for pinning what the workers load.
    """
    options = [model_options(stage) for stage in stages]
    for option in options:
        check_loadable(option)
    if len(options) > 1:
        warn_if_costlier_first(stages, [pair_cost(option) for option in options])
    return [model_version(option) for option in options]


def checked_while_ray_starts(stages: Sequence[CascadeStage]) -> list[str]:
    """:func:`check_stages` on a thread while Ray starts (or connects) here: each takes seconds.

    A model that fails its check still fails with one line, and no worker has run: Ray's daemons
    are up by then and go down with the driver.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-check") as pool:
        checked = pool.submit(check_stages, stages)
        start_ray()  # in the main thread: ray.init installs its SIGTERM handler only there
        return checked.result()


def score_first_stage(
    units: list[WorkUnit], plan: InputPlan, settings: RescoreSettings, version: str, destination: Location
) -> dict[str, str]:
    """Score the input's units with the first (or only) model; returns the bad files skipped."""
    job, stage = settings.job, settings.stages[0]
    score_column = (_stage_columns(settings) or [job.score_column])[0]
    position = POSITION_COLUMN if job.group_column else None
    skip = job.on_bad_file == "skip"
    scoring = UnitScoring(
        plan.location, job.query_column, job.passage_column, score_column, position, skip_bad_files=skip
    )
    options = pinned_model(model_options(stage), version)
    if job.group_column:  # ranked: the order is decided on raw logits, the activation applied on writing
        options = raw_scores(options)
    return score_units(units, scoring, options, job, destination, stage_sizing(stage, job))


def finish(
    output: Location,
    counts: Mapping[str, Mapping[str, Any]],
    units: tuple[int, int, int],
    bad_files: Mapping[str, str],
    started: float,
    later_stages: Sequence[int] = (),
    rows_expected: int | None = None,
) -> JobSummary:
    """Check the output's rows, write the skipped-files report and the summary, then ``complete``.

    Args:
        output: The output directory.
        counts: Each committed unit's counts, from its footer.
        units: Units in the job, units committed by earlier runs, pairs scored by this run.
        bad_files: Input files left out, and why.
        started: ``time.perf_counter()`` at the start of the run.
        later_stages: Pairs each later cascade stage scored.
        rows_expected: The rows the output files must hold (None: not checked).

    Raises:
        RowsLostError: The output's files hold other than ``rows_expected`` rows.

    """
    num_units, resumed, scored_now = units
    if bad_files:
        report = [{"file": path, "reason": reason} for path, reason in sorted(bad_files.items())]
        write_json(output, SKIPPED_NAME, {"skipped_files": report})
    total = {
        key: sum(unit[key] for unit in counts.values()) for key in ("rows", "scored", "null", "truncated")
    }
    rows_written = count_rows(output)
    if rows_expected is not None:
        check_rows(rows_written, rows_expected, "the output files")
    summary = JobSummary(
        rows_read=total["rows"],
        rows_written=rows_written,
        pairs_scored=total["scored"],
        null_scores=total["null"],
        pairs_truncated=total["truncated"],
        units=num_units,
        units_resumed=resumed,
        files_skipped=len(bad_files),
        pairs_scored_this_run=scored_now,
        wall_seconds=time.perf_counter() - started,
        stage_pairs_scored=[total["scored"], *later_stages] if later_stages else [],
    )
    write_json(output, WRITTEN_NAME, dataclasses.asdict(summary))  # a crash below: a rerun only cleans up
    complete(output, summary)
    return summary


def complete(output: Location, summary: JobSummary) -> None:
    """Clear the working directories, then write ``_SUCCESS`` (the summary) and drop ``_WRITTEN``.

    The working directories go first: a crash before ``_SUCCESS`` leaves no second copy of the data
    beside a finished output, and ``_WRITTEN`` tells the rerun that only this step is left.
    """
    working_dirs = {TMP_DIR, SCORED_DIR, RANKING_DIR} | {
        name for name in list_names(output, prefix="_") if name.startswith(("_select", "_scored"))
    }
    remove_files(output, sorted(working_dirs))
    write_json(output, SUCCESS_NAME, dataclasses.asdict(summary))
    remove_files(output, [WRITTEN_NAME])


def _text_columns(job: JobSettings) -> list[str]:
    return [job.query_column, job.passage_column]


def _stage_columns(settings: RescoreSettings) -> list[str]:
    """A cascade's per-stage score columns (none without a cascade)."""
    cascade = settings.cascade.cascade
    return stage_score_columns(settings.job.score_column, cascade) if cascade else []


def _new_columns(settings: RescoreSettings) -> list[str]:
    job = settings.job
    return [
        job.score_column,
        *_stage_columns(settings),
        *(["rank"] if settings.adds_rank else []),
        *(HIDDEN_COLUMNS if job.group_column else []),
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
        if settings.job.dry_run:
            print(dry_run(settings))
            return 0
        summary = run(settings)
    except RerankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RowsLostError) else 2
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        print(f"error: scoring failed: {type(cause).__name__}: {cause}".splitlines()[0], file=sys.stderr)
        return 1
    except ExecutionTimeoutError as exc:
        print(f"error: {stalled(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not is_transient(exc):
            raise
        print(f"error: storage unavailable: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(summary.line())
    return 0


def stalled(exc: ExecutionTimeoutError) -> str:
    """One line for Ray Data's no-progress limit: how long, what waited, and how to go on.

    Ray Data fails a run that moves no block for ``execution_no_progress_timeout_s`` (30 min by default):
    actors that can never be placed, a cluster that never grows the nodes they need.
    """
    lines = str(exc).splitlines()
    waiting = [line.strip(" -").split(":")[0] for line in lines if line.startswith("  - ")]
    return (
        f"{lines[0].split(' No output')[0].rstrip('.') if lines else 'no progress'}, waiting on "
        f"{', '.join(waiting) or 'the cluster'}; the units committed so far are kept: rerun the same "
        "command to resume (RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S sets the limit, -1 none)"
    )


def cli() -> None:
    """Process entry point: configure logging, run, exit with main()'s code.

    Logging is the process's to configure, not main()'s: tests call main() in-process.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    sys.exit(main())


if __name__ == "__main__":
    cli()
