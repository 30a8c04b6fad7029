"""Evaluate scored (query, document) pairs against TREC qrels, with trec_eval's definitions.

    python -m jobs.evaluate --scores URI --qrels FILE [--query-column qid] [--doc-column pid]
        [--score-column score] [--relevance-threshold 2]
    python -m jobs.evaluate --run RUN_FILE --qrels FILE

Prints one JSON object: ``ndcg@10`` (graded gains), ``mrr@10`` and ``recall@100`` (grade >=
``--relevance-threshold``), ``judged@10``, and ``queries`` (queries both in the run and the qrels).
The measures come from ``ir-measures`` (trec_eval underneath; ``pip install 'ray-rerank[eval]'``).

Memory: the scores are streamed in chunks and only each query's ``DEPTH`` (100) best rows are kept,
so the driver holds at most ``queries x 100`` rows plus one chunk, however deep the run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from jobs.settings import EvaluateSettings
from jobs.storage import check_present_columns, find_input_files, read_footers
from jobs.trec import RUN_CHUNK_ROWS, iter_run_file, read_qrels
from reranker.errors import ConfigError, InputError, RerankError
from reranker.settings import parse_flags

DEPTH = 100  # the deepest cutoff of any reported measure
_RUN_DTYPES = {"query_id": "str", "doc_id": "str", "score": "float64"}


def measures(relevance_threshold: int) -> dict[str, Any]:
    """The reported measures by output name, as ``ir_measures`` objects.

    Raises:
        ConfigError: ``ir-measures`` is not installed.

    """
    try:
        import ir_measures
    except ImportError:
        raise ConfigError(
            "jobs.evaluate needs the ir-measures package: pip install 'ray-rerank[eval]'"
        ) from None
    return {
        "ndcg@10": ir_measures.nDCG @ 10,
        "mrr@10": ir_measures.RR(rel=relevance_threshold) @ 10,
        "recall@100": ir_measures.R(rel=relevance_threshold) @ 100,
        "judged@10": ir_measures.Judged @ 10,
    }


def trec_order(run: pd.DataFrame, depth: int = DEPTH) -> pd.DataFrame:
    """Each query's ``depth`` best documents in trec_eval's order.

    That is score descending, ties by docno descending (as strings). A document listed twice for a
    query keeps its best score; rows with a null score are dropped.
    """
    ordered = run.dropna(subset=["score"]).sort_values(
        ["query_id", "score", "doc_id"], ascending=[True, False, False], kind="stable"
    )
    ordered = ordered.drop_duplicates(["query_id", "doc_id"], keep="first")
    return ordered.groupby("query_id", sort=False).head(depth)


def top_ranked(
    chunks: Iterable[pd.DataFrame], depth: int = DEPTH, buffer_rows: int = RUN_CHUNK_ROWS
) -> pd.DataFrame:
    """Stream run chunks, keeping only each query's ``depth`` best rows (bounded memory)."""
    kept = pd.DataFrame({"query_id": [], "doc_id": [], "score": []}).astype(_RUN_DTYPES)
    pending: list[pd.DataFrame] = []
    pending_rows = 0
    for chunk in chunks:
        pending.append(chunk)
        pending_rows += len(chunk)
        if pending_rows >= buffer_rows:
            kept, pending, pending_rows = trec_order(pd.concat([kept, *pending]), depth), [], 0
    return trec_order(pd.concat([kept, *pending]), depth)


def iter_scores(settings: EvaluateSettings) -> Iterator[pd.DataFrame]:
    """The ``--scores`` Parquet dataset as chunks of ``query_id``, ``doc_id`` (str) and ``score``.

    Raises:
        InputError: A file lacks a column or has a non-numeric score column.

    """
    assert settings.scores is not None
    ordering = settings.rank_column or settings.score_column
    columns = [settings.query_column, settings.doc_column, ordering]
    location, files = find_input_files(settings.scores, settings.storage_options)
    for path, footer in zip(files, read_footers(location, files), strict=True):
        if isinstance(footer, InputError):
            raise footer
        schema = footer.schema
        check_present_columns(schema, columns, path)
        score_type = schema.field(ordering).type
        if not (pa.types.is_floating(score_type) or pa.types.is_integer(score_type)):
            raise InputError(f"column {ordering!r} in {path} has type {score_type}; expected a number")
    filesystem = location.arrow_filesystem() or pafs.LocalFileSystem()
    dataset = pads.dataset(files, format="parquet", filesystem=filesystem)
    sign = -1.0 if settings.rank_column else 1.0  # rank 1 is the best: its score is the highest
    for batch in dataset.to_batches(columns=columns, batch_size=RUN_CHUNK_ROWS):
        yield pd.DataFrame(
            {
                "query_id": pc.cast(batch.column(0), pa.string()).to_pandas(),
                "doc_id": pc.cast(batch.column(1), pa.string()).to_pandas(),
                "score": sign * pc.cast(batch.column(2), pa.float64()).to_pandas(),
            }
        )


def evaluate(settings: EvaluateSettings) -> dict[str, float | int]:
    """Compute the measures of ``--scores`` (or ``--run``) against ``--qrels``.

    Raises:
        RerankError: A user error: missing library, unreadable input, no judged query.

    """
    chosen = measures(settings.relevance_threshold)
    assert settings.qrels is not None
    qrels = read_qrels(settings.qrels, settings.storage_options)
    if settings.run is not None:
        chunks: Iterable[pd.DataFrame] = iter_run_file(settings.run, settings.storage_options)
    else:
        chunks = iter_scores(settings)
    run = top_ranked(chunks)
    judged_queries = set(run["query_id"]) & set(qrels["query_id"])
    if not judged_queries:
        run_ids, qrels_ids = run["query_id"].head(3).tolist(), qrels["query_id"].head(3).tolist()
        raise InputError(
            "no query of the run has judgments in the qrels "
            f"(run query ids like {run_ids}, qrels like {qrels_ids})"
        )
    return _aggregate(chosen, qrels, run, len(judged_queries))


def _aggregate(
    chosen: dict[str, Any], qrels: pd.DataFrame, run: pd.DataFrame, queries: int
) -> dict[str, float | int]:
    import ir_measures

    # Rank-valued scores: every measure (trec_eval's, and ir-measures' own judged@10) sees trec_eval's order.
    position = run.groupby("query_id", sort=False).cumcount()
    ranked = run.assign(score=(DEPTH - position).astype("float64"))
    values = ir_measures.calc_aggregate(list(chosen.values()), qrels, ranked)
    result: dict[str, float | int] = {name: float(values[measure]) for name, measure in chosen.items()}
    result["queries"] = queries
    return result


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The flags given (one per setting, see ``--help``): keyword overrides for ``EvaluateSettings.load``."""
    return parse_flags(
        EvaluateSettings, argv, prog="python -m jobs.evaluate", description=__doc__.splitlines()[0]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the measures as one JSON object; a user error prints one line and returns 2."""
    try:
        settings = EvaluateSettings.load(**parse_args(argv))
        result = evaluate(settings)
    except RerankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rounded = {name: round(value, 4) if isinstance(value, float) else value for name, value in result.items()}
    print(json.dumps({**rounded, "relevance_threshold": settings.relevance_threshold}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
