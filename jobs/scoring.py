"""The three stages a work unit goes through (pool sizing: ``jobs.resources``; ranking: ``jobs.ranking``).

Each row of the job's dataset is one work unit: ``tokenize_units`` (CPU tasks) reads its rows and
tokenizes them, ``ScoreUnits`` (actors, one per GPU or a share of a node's CPUs) runs the model,
``commit_units`` (CPU tasks) writes the unit's output file atomically. A unit's rows travel between
stages as Arrow IPC bytes, so no stage can split or merge units.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.commit import commit_table
from jobs.ranking import input_positions
from jobs.retries import is_transient, with_retries
from jobs.storage import Location
from jobs.units import WorkUnit, read_unit
from reranker.settings import ModelOptions
from reranker.tokenizer import EncodedPairs, PairTokenizer

if TYPE_CHECKING:
    from reranker.model import CrossEncoderModel


def valid_text_mask(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where the value is a non-null string with a non-whitespace character."""
    if pa.types.is_null(column.type):
        return np.zeros(len(column), dtype=bool)
    has_text = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    return np.asarray(pc.fill_null(has_text, False).to_numpy(zero_copy_only=False), dtype=bool)


UNIT_FIELDS = [
    pa.field("name", pa.string()),
    pa.field("file_index", pa.int64()),
    pa.field("path", pa.string()),
    pa.field("row_start", pa.int64()),
    pa.field("row_stop", pa.int64()),
    pa.field("error", pa.string()),
    pa.field("timings", pa.string()),
]
TOKENIZED_SCHEMA = pa.schema(
    [*UNIT_FIELDS, pa.field("table", pa.large_binary()), pa.field("tokens", pa.large_binary())]
)
SCORED_SCHEMA = pa.schema(
    [*UNIT_FIELDS, pa.field("table", pa.large_binary()), pa.field("counts", pa.string())]
)
COMMITTED_SCHEMA = pa.schema([*UNIT_FIELDS, pa.field("counts", pa.string())])


def unit_rows(units: Sequence[WorkUnit]) -> list[dict[str, Any]]:
    """The job's input dataset: one row per work unit."""
    return [
        {
            "name": u.name,
            "file_index": u.file_index,
            "path": u.path,
            "row_start": u.row_start,
            "row_stop": u.row_stop,
            "error": None,
            "timings": "{}",
        }
        for u in units
    ]


def to_ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes (how a unit's rows travel between stages)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    """The table ``to_ipc`` wrote."""
    return pa.ipc.open_stream(data).read_all()


@functools.lru_cache(maxsize=4)
def tokenizer_for(settings: ModelOptions) -> PairTokenizer:
    """One tokenizer per worker process and settings, so a task doesn't reload it."""
    return PairTokenizer(settings)


def tokenize_task_env(io_cpus: float) -> dict[str, Any]:
    """The runtime env of tokenization tasks: the tokenizer's thread pool sized to the task's CPUs.

    It is read once, when the pool starts. A runtime env of its own also keeps Ray Data from fusing
    tokenization into the scoring actors (fusion needs equal remote args).
    """
    return {"env_vars": {"RAYON_NUM_THREADS": str(max(1, round(io_cpus)))}}


def tokenize_table(
    tokenizer: PairTokenizer, table: pa.Table, query_column: str, passage_column: str
) -> pa.Table:
    """Token ids of each row's pair: a null list where the query or passage is null or blank."""
    queries, passages = table.column(query_column), table.column(passage_column)
    valid = valid_text_mask(queries) & valid_text_mask(passages)
    encoded = tokenizer.tokenize(
        pc.filter(queries, valid).to_pylist(), pc.filter(passages, valid).to_pylist()
    )
    lengths = np.zeros(table.num_rows, dtype=np.int64)
    lengths[valid] = encoded.lengths
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]))  # int64: a unit may pass 2**31 tokens
    mask = pa.array(~valid)
    columns = {"input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(encoded.input_ids), mask=mask)}
    if encoded.token_type_ids is not None:
        columns["token_type_ids"] = pa.LargeListArray.from_arrays(
            offsets, pa.array(encoded.token_type_ids), mask=mask
        )
    truncated = np.zeros(table.num_rows, dtype=bool)
    truncated[valid] = encoded.truncated
    columns["truncated"] = pa.array(truncated)
    return pa.table(columns)


def encoded_from_table(tokens: pa.Table) -> tuple[EncodedPairs, np.ndarray]:
    """The scorable rows of a ``tokenize_table`` result as ``EncodedPairs``, and the valid-row mask."""
    ids = tokens.column("input_ids").combine_chunks()
    valid = np.asarray(ids.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    lengths = np.diff(ids.offsets.to_numpy())[valid]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    start = ids.offsets[0].as_py()
    token_types = None
    if "token_type_ids" in tokens.column_names:
        types = tokens.column("token_type_ids").combine_chunks()
        token_types = types.values.to_numpy()[start : start + offsets[-1]]
    truncated = tokens.column("truncated").to_numpy()[valid]
    values = ids.values.to_numpy()[start : start + offsets[-1]]
    return EncodedPairs(values, offsets, token_types, truncated), valid


def tokenize_units(
    batch: pa.Table,
    source: Location,
    model_settings: ModelOptions,
    query_column: str,
    passage_column: str,
) -> pa.Table:
    """Ray Data task: read each unit's rows and tokenize them on CPU (a bad file becomes an error row)."""
    rows = []
    for unit in batch.to_pylist():
        started = time.perf_counter()
        try:
            reading = functools.partial(read_unit, source.fs, _unit(unit))
            table = with_retries(reading, f"reading {unit['path']}")
        except Exception as exc:
            if is_transient(exc):
                raise
            rows.append({**unit, "error": f"cannot read Parquet file {unit['path']}: {_first_line(exc)}"})
            continue
        read_s = time.perf_counter() - started
        tokens = tokenize_table(tokenizer_for(model_settings), table, query_column, passage_column)
        timings = {"read_s": read_s, "tokenize_s": time.perf_counter() - started - read_s}
        rows.append(
            {**unit, "table": to_ipc(table), "tokens": to_ipc(tokens), "timings": json.dumps(timings)}
        )
    return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)


def _unit(row: dict[str, Any]) -> WorkUnit:
    return WorkUnit(row["file_index"], row["path"], row["row_start"], row["row_stop"])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def score_tokens(model: CrossEncoderModel, tokens: pa.Table) -> tuple[pa.Array, dict[str, int]]:
    """float32 scores of a ``tokenize_table`` result (null where there was nothing to score), and counts."""
    encoded, valid = encoded_from_table(tokens)
    scores = np.zeros(tokens.num_rows, dtype=np.float32)
    scores[valid] = model.score_encoded(encoded)
    counts = {
        "rows": tokens.num_rows,
        "scored": int(valid.sum()),
        "null": int((~valid).sum()),
        "truncated": int(encoded.truncated.sum()),
        "tokens": int(encoded.lengths.sum()),
    }
    return pa.array(scores, pa.float32(), mask=~valid), counts


class ScoreUnits:
    """Ray Data callable class: loads the model once per actor, then scores tokenized units."""

    def __init__(
        self, model_settings: ModelOptions, score_column: str, position_column: str | None = None
    ) -> None:
        from reranker.model import CrossEncoderModel  # torch only here: not on the driver or CPU tasks

        self.model = CrossEncoderModel.from_settings(model_settings)
        self.score_column = score_column
        self.position_column = position_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Append a float32 score column to each unit's rows (null where there was nothing to score)."""
        return pa.Table.from_pylist([self.score_unit(row) for row in batch.to_pylist()], schema=SCORED_SCHEMA)

    def score_unit(self, row: dict[str, Any]) -> dict[str, Any]:
        """Score one unit row of ``tokenize_units``; an error row passes through."""
        if row["error"] is not None:
            return {**row, "table": None, "counts": None}
        started, started_at = time.perf_counter(), time.time()
        table = from_ipc(row["table"])
        scores, counts = score_tokens(self.model, from_ipc(row["tokens"]))
        scored = table.append_column(self.score_column, scores)
        if self.position_column is not None:
            scored = scored.append_column(self.position_column, input_positions(_unit(row)))
        timings = {
            **json.loads(row["timings"]),
            "forward_s": time.perf_counter() - started,
            "forward_started_at": started_at,
        }
        return {**row, "table": to_ipc(scored), "counts": json.dumps(counts), "timings": json.dumps(timings)}


def commit_units(batch: pa.Table, destination: Location) -> pa.Table:
    """Ray Data task: commit each scored unit as its own output file; returns one manifest row per unit."""
    rows = []
    for row in batch.to_pylist():
        if row["error"] is None:
            started = time.perf_counter()
            commit_table(destination, row["name"], from_ipc(row["table"]), json.loads(row["counts"]))
            timings = {**json.loads(row["timings"]), "write_s": time.perf_counter() - started}
            row["timings"] = json.dumps(timings)
        rows.append({key: row[key] for key in COMMITTED_SCHEMA.names})
    return pa.Table.from_pylist(rows, schema=COMMITTED_SCHEMA)
