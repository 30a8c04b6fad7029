"""Rescore Parquet (query, passage) pairs with a cross-encoder on a Ray Data actor pool.

    python -m jobs.rescore --input URI --output URI [--model ID_OR_PATH] [--config FILE] ...

Runs on embedded local Ray, or on a cluster via ``ray job submit --working-dir . -- python -m
jobs.rescore ...``. Ends with one summary line.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import ray
import ray.data

from jobs.scoring import (
    ActorPoolPlan,
    JobStats,
    ScoreBatch,
    alive_node_resources,
    plan_actor_pool,
    rank_group,
)
from jobs.storage import InputPlan, count_rows, inspect_input, prepare_output, write_empty_output
from reranker.errors import ConfigError, RerankError
from reranker.model import check_loadable
from reranker.settings import JobSettings, RescoreSettings, add_settings_arguments, overrides_from_args

logger = logging.getLogger("jobs.rescore")
ROWS_PER_RANK_PARTITION = 100_000
MAX_RANK_PARTITIONS = 200


@dataclass(frozen=True)
class JobSummary:
    """What one run did."""

    rows_read: int
    rows_written: int
    pairs_scored: int
    null_scores: int
    pairs_truncated: int
    wall_seconds: float

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        rate = self.pairs_scored / self.wall_seconds if self.wall_seconds > 0 else 0.0
        return (
            f"rescore: rows read {self.rows_read}, rows written {self.rows_written}, "
            f"pairs scored {self.pairs_scored}, null scores {self.null_scores}, "
            f"pairs truncated {self.pairs_truncated}, {rate:.1f} pairs/s, wall {self.wall_seconds:.1f}s"
        )


def output_schema(input_schema: pa.Schema, job: JobSettings) -> pa.Schema:
    """Input columns, then the float32 score column, then ``rank`` when asked for."""
    schema = input_schema.append(pa.field(job.score_column, pa.float32()))
    return schema.append(pa.field("rank", pa.int32())) if job.rank else schema


def run(settings: RescoreSettings) -> JobSummary:
    """Validate the input, score it on an actor pool, write the output, and summarize.

    Raises:
        RerankError: A user error (settings, input, output, model); nothing was written.

    """
    started = time.perf_counter()
    job = settings.job
    if not job.input or not job.output:
        raise ConfigError("both --input and --output are required (or RERANK_INPUT / RERANK_OUTPUT)")
    plan = inspect_input(job.input, job.storage_options, _text_columns(job), _new_columns(job))
    check_loadable(settings.model)  # on the driver: a bad model is one line, not a worker traceback per actor
    output = prepare_output(job.output, job.storage_options, job.overwrite)
    if plan.num_rows == 0:
        write_empty_output(output, output_schema(plan.schema, job))
        return JobSummary(0, 0, 0, 0, 0, time.perf_counter() - started)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    pool = plan_actor_pool(alive_node_resources(), job, settings.model.torch_threads)
    logger.info("actor pool: %s", pool)
    stats = JobStats.remote()  # type: ignore[attr-defined]
    build_pipeline(plan, settings, pool, stats).write_parquet(
        output.path,
        filesystem=output.arrow_filesystem(),
        ray_remote_args={"num_cpus": job.io_cpus},
    )
    counts = ray.get(stats.snapshot.remote())
    return JobSummary(
        rows_read=counts["rows"],
        rows_written=count_rows(output),
        pairs_scored=counts["scored"],
        null_scores=counts["null"],
        pairs_truncated=counts["truncated"],
        wall_seconds=time.perf_counter() - started,
    )


def build_pipeline(
    plan: InputPlan, settings: RescoreSettings, pool: ActorPoolPlan, stats: ray.actor.ActorHandle
) -> ray.data.Dataset:
    """read_parquet -> map_batches(ScoreBatch) on the actor pool -> optional per-query ranking."""
    job = settings.job
    dataset = ray.data.read_parquet(
        plan.files,
        filesystem=plan.location.arrow_filesystem(),
        file_extensions=None,
        num_cpus=job.io_cpus,
    )
    dataset = dataset.map_batches(
        ScoreBatch,
        fn_constructor_kwargs={
            "model_settings": settings.model.model_copy(update={"torch_threads": pool.torch_threads}),
            "query_column": job.query_column,
            "passage_column": job.passage_column,
            "score_column": job.score_column,
            "stats": stats,
        },
        batch_size=job.rows_per_batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.num_actors),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor,
    )
    if job.group_column is None:
        return dataset
    return dataset.groupby(job.group_column, num_partitions=rank_partitions(plan.num_rows)).map_groups(
        rank_group,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={"score_column": job.score_column, "add_rank": job.rank, "top_k": job.top_k},
        batch_format="pyarrow",
        num_cpus=job.io_cpus,
    )


def rank_partitions(num_rows: int) -> int:
    """Hash partitions for the per-query ranking: one per ``ROWS_PER_RANK_PARTITION`` rows, at most 200.

    Ray Data's default is always 200, which makes a small job run 200 reduce tasks.
    """
    return max(1, min(MAX_RANK_PARTITIONS, math.ceil(num_rows / ROWS_PER_RANK_PARTITION)))


def _text_columns(job: JobSettings) -> list[str]:
    return [job.query_column, job.passage_column]


def _new_columns(job: JobSettings) -> list[str]:
    return [job.score_column, *(["rank"] if job.rank else [])]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the job's flags: one per setting, see ``--help``."""
    parser = argparse.ArgumentParser(prog="python -m jobs.rescore", description=__doc__.splitlines()[0])
    add_settings_arguments(parser, RescoreSettings)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; a user error prints one line and returns 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = RescoreSettings.load(**overrides_from_args(parse_args(argv)))
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


if __name__ == "__main__":
    sys.exit(main())
