"""Tokenizing and scoring Arrow tables of (query, passage) rows: the pieces the stage and the job share.

Token ids travel as Arrow large-list columns (``tokenize_table``), so CPU tasks tokenize and the scoring
actors only run the model (``score_tokens``). Null or blank texts get a null score.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reranker.encoders import pair_encoder
from reranker.settings import ModelOptions
from reranker.tokenizer import EncodedPairs, PairEncoder

if TYPE_CHECKING:
    from reranker.model import CrossEncoderModel


def valid_text_mask(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where the value is a non-null string with a non-whitespace character."""
    if pa.types.is_null(column.type):
        return np.zeros(len(column), dtype=bool)
    has_text = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    return np.asarray(pc.fill_null(has_text, False).to_numpy(zero_copy_only=False), dtype=bool)


@functools.lru_cache(maxsize=4)
def tokenizer_for(settings: ModelOptions) -> PairEncoder:
    """One pair encoder per worker process and settings (the model family's, no weights), loaded once."""
    return pair_encoder(settings)


def tokenize_task_env(io_cpus: float) -> dict[str, Any]:
    """The runtime env of tokenization tasks: the tokenizer's thread pool sized to the task's CPUs.

    It is read once, when the pool starts. A runtime env of its own also keeps Ray Data from fusing
    tokenization into the scoring actors (fusion needs equal remote args).
    """
    return {"env_vars": {"RAYON_NUM_THREADS": str(max(1, round(io_cpus)))}}


def tokenize_table(
    tokenizer: PairEncoder,
    table: pa.Table,
    query_column: str,
    passage_column: str,
    selected: pa.ChunkedArray | pa.Array | None = None,
    instruction: str | None = None,
) -> pa.Table:
    """Token ids of each row's pair: a null list where the query or passage is null or blank.

    With ``selected`` (bools), rows where it is not true get a null list too (not scored).
    ``instruction`` goes to a model that takes one (the model settings' ``instruction``).
    """
    queries, passages = table.column(query_column), table.column(passage_column)
    valid = valid_text_mask(queries) & valid_text_mask(passages)
    if selected is not None:
        valid &= np.asarray(pc.fill_null(selected, False).to_numpy(zero_copy_only=False), dtype=bool)
    encoded = tokenizer.tokenize(
        pc.filter(queries, valid).to_pylist(), pc.filter(passages, valid).to_pylist(), instruction=instruction
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
