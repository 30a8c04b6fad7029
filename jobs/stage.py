"""A reranking stage for any Ray Data Dataset of (query, passage) rows: one lazy call.

    import ray.data
    from jobs.stage import add_scores

    pairs = ray.data.read_json("pairs.jsonl").filter(lambda row: row["lang"] == "en")
    add_scores(pairs, "cross-encoder/ms-marco-TinyBERT-L2-v2").write_parquet("scored/")

Built from the job's pieces, so its shape on CPU and GPU is the job's: a CPU tokenization stage (Ray
tasks, ``tokenize_table``), then a scoring actor pool sized from the cluster by ``plan_actor_pool`` (one
actor per GPU; on CPUs, actors that leave ``io_cpus`` free on every node), each actor loading the model
once and scoring in token-budget batches (``score_tokens``). It changes no process-wide Ray Data setting.
"""

from __future__ import annotations

import pyarrow as pa
import ray.data

from jobs.resources import PoolRequest, alive_node_resources, plan_actor_pool
from jobs.scoring import ScoreUnits, score_tokens, tokenize_table, tokenize_task_env, tokenizer_for
from reranker.errors import InputError
from reranker.loading import check_loadable
from reranker.settings import DEFAULT_MODEL, ModelOptions

TOKEN_COLUMNS = {  # tokenize_table's columns, as they travel hidden beside the user's
    "input_ids": "__rerank_input_ids",
    "token_type_ids": "__rerank_token_type_ids",
    "truncated": "__rerank_truncated",
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

    Raises:
        ModelLoadError: The model can't be loaded or has no trained head (checked here, on the driver).
        InputError: The dataset's known schema lacks a column, or would be overwritten.
    """
    options = model if isinstance(model, ModelOptions) else ModelOptions.model_validate({"model": model})
    _check_columns(dataset, [query_column, passage_column], score_column)
    check_loadable(options)
    request = PoolRequest(num_actors, cpus_per_actor, gpus_per_actor, io_cpus)
    pool = plan_actor_pool(alive_node_resources(), request, options.torch_threads)
    tokenized = dataset.map_batches(
        tokenize_rows,  # type: ignore[arg-type]  # its extra parameters are bound by fn_kwargs
        fn_kwargs={
            "model_options": options,
            "query_column": query_column,
            "passage_column": passage_column,
        },
        batch_size=batch_rows,
        batch_format="pyarrow",
        num_cpus=io_cpus,
        compute=ray.data.TaskPoolStrategy(size=pool.tokenize_tasks),
        runtime_env=tokenize_task_env(io_cpus),
    )
    return tokenized.map_batches(
        ScoreRows,
        fn_constructor_kwargs={
            "model_options": options.model_copy(update={"torch_threads": pool.torch_threads}),
            "score_column": score_column,
        },
        batch_size=batch_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.num_actors),
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
    batch: pa.Table, model_options: ModelOptions, query_column: str, passage_column: str
) -> pa.Table:
    """Ray Data task: the batch with its pairs' token ids appended (hidden columns the actors consume)."""
    tokens = tokenize_table(tokenizer_for(model_options), batch, query_column, passage_column)
    for name in tokens.column_names:
        batch = batch.append_column(TOKEN_COLUMNS[name], tokens.column(name))
    return batch


class ScoreRows(ScoreUnits):
    """Ray Data callable class: loads the model once per actor, scores batches of ``tokenize_rows``."""

    def __init__(self, model_options: ModelOptions, score_column: str) -> None:
        super().__init__(model_options, score_column)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch without its token columns, with the score column."""
        hidden = [column for column in TOKEN_COLUMNS.values() if column in batch.column_names]
        tokens = batch.select(hidden).rename_columns(
            [name for name, column in TOKEN_COLUMNS.items() if column in hidden]
        )
        scores, _ = score_tokens(self.model, tokens)
        return batch.drop_columns(hidden).append_column(self.score_column, scores)
