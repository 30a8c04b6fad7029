"""Tokenizing and scoring Arrow tables of (query, passage) rows: the pieces the stage and the job share.

Token ids travel as Arrow large-list columns (``tokenize_table``), so CPU tasks tokenize and the scoring
actors only run the model (``score_tokens``). Null or blank texts get a null score.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reranker.chunking import Chunked, best_of, split_long, sum_of
from reranker.encoders import pair_encoder
from reranker.settings import ModelOptions
from reranker.tokenizer import EncodedPairs, PairEncoder

if TYPE_CHECKING:
    from reranker.model import CrossEncoderModel


@dataclass(frozen=True)
class Chunking:
    """How a row's passage too long for its pair is scored: up to ``max_chunks`` windows, the best kept."""

    max_chunks: int
    overlap: int

    @classmethod
    def of(cls, options: ModelOptions) -> Chunking | None:
        """The model settings' chunking; None when a long passage is cut to fit (``max_chunks_per_doc`` 1)."""
        if options.max_chunks_per_doc == 1:
            return None
        return cls(options.max_chunks_per_doc, options.chunk_overlap_tokens)


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
    chunking: Chunking | None = None,
) -> pa.Table:
    """Token ids of each row's pair: a null list where the query or passage is null or blank.

    With ``selected`` (bools), rows where it is not true get a null list too (not scored).
    ``instruction`` goes to a model that takes one (the model settings' ``instruction``). With
    ``chunking`` (up to N windows over 1), a passage too long for its pair becomes several pairs: the row
    holds their ids one after another and a ``chunk_lengths`` list (``reranker.chunking``).
    """
    queries, passages = table.column(query_column), table.column(passage_column)
    valid = valid_text_mask(queries) & valid_text_mask(passages)
    if selected is not None:
        valid &= np.asarray(pc.fill_null(selected, False).to_numpy(zero_copy_only=False), dtype=bool)
    pairs = pc.filter(queries, valid).to_pylist(), pc.filter(passages, valid).to_pylist()
    split = None
    if chunking is not None and chunking.max_chunks > 1:
        split = split_long(tokenizer, *pairs, chunking.max_chunks, chunking.overlap, instruction)
        pairs = split.queries, split.passages
    encoded = tokenizer.tokenize(*pairs, instruction=instruction)
    pair_truncated = encoded.truncated
    columns: dict[str, pa.Array] = {}
    if split is not None:
        columns["chunk_lengths"] = _row_lists(valid, np.bincount(split.owner, minlength=int(valid.sum())),
                                              encoded.lengths.astype(np.int32))  # fmt: skip
        pair_truncated = split.truncated(encoded.truncated)
    lengths = np.zeros(table.num_rows, dtype=np.int64)
    lengths[valid] = _per_row(encoded.lengths, split)
    columns["input_ids"] = _row_lists(valid, lengths[valid], encoded.input_ids)
    if encoded.token_type_ids is not None:
        columns["token_type_ids"] = _row_lists(valid, lengths[valid], encoded.token_type_ids)
    truncated = np.zeros(table.num_rows, dtype=bool)
    truncated[valid] = pair_truncated
    columns["truncated"] = pa.array(truncated)
    return pa.table(columns)


def _per_row(pair_lengths: np.ndarray, split: Chunked | None) -> np.ndarray:
    """Tokens of each row: its pair's, or the sum of its chunk pairs'."""
    return pair_lengths if split is None else sum_of(pair_lengths, split.owner)


def _row_lists(valid: np.ndarray, counts: np.ndarray, values: np.ndarray) -> pa.Array:
    """A large-list column: ``counts[i]`` of ``values`` for each valid row in turn, null for the others."""
    per_row = np.zeros(len(valid), dtype=np.int64)
    per_row[valid] = counts
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]))  # int64: a unit may pass 2**31 tokens
    return pa.LargeListArray.from_arrays(offsets, pa.array(values), mask=pa.array(~valid))


def encoded_from_table(tokens: pa.Table) -> tuple[EncodedPairs, np.ndarray, np.ndarray | None]:
    """The scorable rows of a ``tokenize_table`` result as pairs, their mask, and (chunked) pair owners.

    Returns:
        The pairs, the valid-row mask, and for chunked rows the index among the valid rows of each pair.
    """
    ids = tokens.column("input_ids").combine_chunks()
    valid = np.asarray(ids.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    lengths = np.diff(ids.offsets.to_numpy())[valid]
    owner = None
    if "chunk_lengths" in tokens.column_names:
        chunks = tokens.column("chunk_lengths").combine_chunks()
        counts = np.diff(chunks.offsets.to_numpy())[valid]
        first = chunks.offsets[0].as_py()
        lengths = chunks.values.to_numpy()[first : first + int(counts.sum())].astype(np.int64)
        owner = np.repeat(np.arange(len(counts)), counts)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    start = ids.offsets[0].as_py()
    token_types = None
    if "token_type_ids" in tokens.column_names:
        types = tokens.column("token_type_ids").combine_chunks()
        token_types = types.values.to_numpy()[start : start + offsets[-1]]
    truncated = tokens.column("truncated").to_numpy()[valid]
    if owner is not None:
        truncated = truncated[owner]  # a chunk pair carries its row's flag (only rows are counted)
    values = ids.values.to_numpy()[start : start + offsets[-1]]
    return EncodedPairs(values, offsets, token_types, truncated), valid, owner


def score_tokens(model: CrossEncoderModel, tokens: pa.Table) -> tuple[pa.Array, dict[str, int]]:
    """float32 scores of a ``tokenize_table`` result (null where there was nothing to score), and counts.

    A chunked row scores as its best chunk pair.
    """
    encoded, valid, owner = encoded_from_table(tokens)
    scores = np.zeros(tokens.num_rows, dtype=np.float32)
    pair_scores = model.score_encoded(encoded)
    scores[valid] = pair_scores if owner is None else best_of(pair_scores, owner)
    counts = {
        "rows": tokens.num_rows,
        "scored": int(valid.sum()),
        "null": int((~valid).sum()),
        "truncated": int(tokens.column("truncated").to_numpy()[valid].sum()),
        "tokens": int(encoded.lengths.sum()),
    }
    return pa.array(scores, pa.float32(), mask=~valid), counts
