"""A reranking stage for any Ray Data Dataset of (query, passage) rows: one lazy call.

    import ray.data
    from jobs.stage import add_scores

    pairs = ray.data.read_json("pairs.jsonl").filter(lambda row: row["lang"] == "en")
    add_scores(pairs, "cross-encoder/ms-marco-TinyBERT-L2-v2").write_parquet("scored/")

Two steps (``append_scoring``): a CPU tokenization stage (Ray tasks, ``tokenize_rows``), then a scoring
actor pool sized from the cluster by ``plan_actor_pool`` (one actor per GPU; on CPUs, actors that leave
``io_cpus`` free on every node), each actor loading the model once and scoring in token-budget batches
(``ScoreRows``). The rescoring job is these steps run on its work units (``jobs.pipeline``), so the two
have one shape on CPU and GPU. The stage changes no process-wide Ray Data setting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray.data

from jobs.cluster import cluster_shape
from jobs.resources import ActorPoolPlan, PoolRequest, plan_actor_pool
from jobs.scoring import Chunking, score_tokens, tokenize_table, tokenize_task_env, tokenizer_for
from reranker.errors import InputError
from reranker.loading import check_loadable, model_version, pinned_model
from reranker.settings import DEFAULT_MODEL, ModelOptions

TOKEN_COLUMNS = {  # tokenize_table's columns, as they travel hidden beside the user's
    "input_ids": "__rerank_input_ids",
    "token_type_ids": "__rerank_token_type_ids",
    "truncated": "__rerank_truncated",
    "chunk_lengths": "__rerank_chunk_lengths",
}
DEFAULT_BATCH_ROWS = 4096


def add_scores(
    dataset: ray.data.Dataset,
    model: str | ModelOptions = DEFAULT_MODEL,
    *,
    query_column: str = "query",
    passage_column: str = "passage",
    score_column: str = "score",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    num_actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    io_cpus: float = 1.0,
) -> ray.data.Dataset:
    """The dataset with a float32 ``score_column`` added to every row (null where a text is null or blank).

    Lazy, like every Ray Data transform: nothing runs until the result is consumed or written.

    Args:
        dataset: Rows holding a query and a passage column (strings); every column is kept.
        model: A hub id or local directory, or ``ModelOptions`` (precision, max length, ...).
        query_column: Column holding the query text.
        passage_column: Column holding the passage text.
        score_column: Name of the score column to add.
        batch_rows: Rows per tokenization task and per actor call.
        num_actors: Scoring actors (default: one per GPU, else from the CPUs).
        cpus_per_actor: CPUs each actor reserves (default: derived).
        gpus_per_actor: GPUs each actor reserves (default: 1 when the cluster has GPUs).
        io_cpus: CPUs each tokenization task reserves, left free by the actors on every node.

    A hub model is pinned here, on the driver, to the commit its revision (default ``main``) points
    at now: a long pipeline never mixes two versions of the model or of its tokenizer.

    Raises:
        ModelLoadError: The model can't be loaded or has no trained head, or a hub model's commit
            can't be resolved (checked here, on the driver).
        InputError: The dataset's known schema lacks a column, or would be overwritten.
    """
    options = model if isinstance(model, ModelOptions) else ModelOptions.model_validate({"model": model})
    _check_columns(dataset, [query_column, passage_column], score_column)
    check_loadable(options)
    options = pinned_model(options, model_version(options))  # every task and actor: one hub commit
    request = PoolRequest(num_actors, cpus_per_actor, gpus_per_actor, io_cpus)
    pool = plan_actor_pool(cluster_shape(), request, options.torch_threads)
    steps = ScoringSteps(
        tokenize=tokenize_rows,
        scorer=ScoreRows,
        batch_size=batch_rows,
        tokenize_kwargs={"query_column": query_column, "passage_column": passage_column},
        scorer_kwargs={"score_column": score_column},
    )
    return append_scoring(dataset, steps, options, pool, io_cpus)


@dataclass(frozen=True)
class ScoringSteps:
    """What the two scoring steps run: a tokenize function (CPU tasks) and a scorer class (actors).

    The stage runs ``tokenize_rows`` and ``ScoreRows`` on a user's rows; the job runs its unit-level
    wrappers of them (``jobs.pipeline``). Both take ``model_options`` plus the keywords here.
    """

    tokenize: Callable[..., pa.Table]
    scorer: type[ScoreRows]
    batch_size: int
    tokenize_kwargs: dict[str, Any] = field(default_factory=dict)
    scorer_kwargs: dict[str, Any] = field(default_factory=dict)


def append_scoring(
    dataset: ray.data.Dataset, steps: ScoringSteps, options: ModelOptions, pool: ActorPoolPlan, io_cpus: float
) -> ray.data.Dataset:
    """Add tokenize tasks (CPU) and a scoring actor pool: the one shape of the stage and the job."""
    tokenized = dataset.map_batches(
        steps.tokenize,  # its extra parameters are bound by fn_kwargs
        fn_kwargs={"model_options": options, **steps.tokenize_kwargs},
        batch_size=steps.batch_size,
        batch_format="pyarrow",
        num_cpus=io_cpus,
        compute=ray.data.TaskPoolStrategy(size=pool.tokenize_tasks),
        runtime_env=tokenize_task_env(io_cpus),  # also keeps tokenization from fusing into the actors
    )
    return tokenized.map_batches(
        steps.scorer,
        fn_constructor_kwargs={
            "model_options": options.model_copy(update={"torch_threads": pool.torch_threads}),
            **steps.scorer_kwargs,
        },
        batch_size=steps.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=pool.min_size, max_size=pool.num_actors, initial_size=pool.num_actors
        ),  # the whole pool is asked for at once: pending actors make the autoscaler add their nodes
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor,
    )


def _check_columns(dataset: ray.data.Dataset, text_columns: list[str], score_column: str) -> None:
    """Check the columns on the driver when the schema is known without running anything."""
    schema = dataset.schema(fetch_if_missing=False)
    if schema is None:
        return
    names = list(schema.names)
    for column in text_columns:
        if column not in names:
            raise InputError(f"column {column!r} not found in the dataset (columns: {', '.join(names)})")
    if score_column in names:
        raise InputError(
            f"column {score_column!r} already exists in the dataset; choose another score_column"
        )


def tokenize_rows(
    batch: pa.Table,
    model_options: ModelOptions,
    query_column: str,
    passage_column: str,
    select_column: str | None = None,
) -> pa.Table:
    """Ray Data task: the batch with its pairs' token ids appended (hidden columns the actors consume).

    With ``select_column`` (a bool column), only the rows where it is true are tokenized (and scored).
    """
    selected = None if select_column is None else batch.column(select_column)
    tokenizer = tokenizer_for(model_options)
    tokens = tokenize_table(
        tokenizer,
        batch,
        query_column,
        passage_column,
        selected,
        model_options.instruction,
        Chunking.of(model_options),
    )
    for name in tokens.column_names:
        batch = batch.append_column(TOKEN_COLUMNS[name], tokens.column(name))
    return batch


class ScoreRows:
    """Ray Data callable class: loads the model once per actor, scores batches of ``tokenize_rows``."""

    def __init__(self, model_options: ModelOptions, score_column: str) -> None:
        from reranker.model import CrossEncoderModel  # torch only here: not on the driver or CPU tasks

        self.model = CrossEncoderModel.from_settings(model_options)
        self.score_column = score_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch without its token columns, with the score column."""
        return self.score_table(batch)[0]

    def score_table(self, table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        """A ``tokenize_rows`` table scored (token columns dropped), and its counts (rows, nulls, ...)."""
        hidden = [column for column in TOKEN_COLUMNS.values() if column in table.column_names]
        tokens = table.select(hidden).rename_columns(
            [name for name, column in TOKEN_COLUMNS.items() if column in hidden]
        )
        scores, counts = score_tokens(self.model, tokens)
        return table.drop_columns(hidden).append_column(self.score_column, scores), counts
