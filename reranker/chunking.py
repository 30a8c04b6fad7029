"""Long documents scored whole, as Cohere's rerank does: split into overlapping windows, best one kept.

A passage whose pair fits the model's ``max_length`` stays one pair, exactly as without chunking. A longer
one becomes up to ``max_chunks`` pairs of the same query with consecutive windows of the passage, each
``room`` tokens (what the pair leaves the passage: ``max_length`` less the query, the template and the
special tokens), overlapping by ``overlap`` tokens, cut between whole words. The passage's score is its
best window's (``best_of``). Windows past ``max_chunks`` are not scored: such a passage counts as cut.

This is the CPU half (pairs to pairs, no weights): the library, the job's tokenize tasks and the service's
engine call it before tokenizing, so chunk pairs ride the same token-budget batches as any other pair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reranker.tokenizer import PairEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunked:
    """Pairs after splitting: each chunk pair's query and passage window, and whose pair it is."""

    queries: list[str]
    passages: list[str]
    owner: np.ndarray  # int64, non-decreasing: the input pair of each chunk pair
    cut: np.ndarray  # bool per input pair: longer than ``max_chunks`` windows (its end not scored)
    windowed: np.ndarray  # bool per input pair: split into windows (each sized to fill its pair)

    def truncated(self, flags: np.ndarray) -> np.ndarray:
        """Each input pair's truncation: if windowed, ``cut``; else its one pair's flag.

        A window fills its pair, which an encoder may flag as truncated though nothing was lost.
        """
        return np.where(self.windowed, self.cut, any_of(flags, self.owner))


def split_long(
    encoder: PairEncoder,
    queries: Sequence[str],
    passages: Sequence[str],
    max_chunks: int,
    overlap: int,
    instruction: str | None = None,
    max_length: int | None = None,
) -> Chunked:
    """Each pair whose passage does not fit split into up to ``max_chunks`` overlapping windows.

    ``max_length`` (at most the encoder's) is what a pair holds.
    """
    tokenizer = encoder.tokenizer
    if not len(passages) or not tokenizer.is_fast:  # nothing to split, or no offsets to split by
        if len(passages) and not tokenizer.is_fast:
            logger.warning(
                "max_chunks_per_doc: this model's tokenizer has no offsets; passages are cut to fit"
            )
        none = np.zeros(len(passages), bool)
        return Chunked(list(queries), list(passages), np.arange(len(passages)), none, none)
    limit = min(max_length or encoder.max_length, encoder.max_length)
    rooms = _rooms(encoder, queries, instruction, limit)
    encoding = tokenizer(list(passages), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    chunk_queries: list[str] = []
    chunk_passages: list[str] = []
    owner: list[int] = []
    cut = np.zeros(len(passages), dtype=bool)
    windowed = np.zeros(len(passages), dtype=bool)
    for index, (query, passage) in enumerate(zip(queries, passages, strict=True)):
        offsets, room = encoding["offset_mapping"][index], rooms[query]
        if len(offsets) <= room or room < 2:  # fits (or nothing would): the pair as it is
            windows = [passage]
        else:
            spans = _windows(encoding.word_ids(index), room, min(overlap, room // 2), max_chunks)
            windows = [passage[offsets[start][0] : offsets[stop - 1][1]] for start, stop in spans]
            cut[index], windowed[index] = spans[-1][1] < len(offsets), True
        chunk_queries += [query] * len(windows)
        chunk_passages += windows
        owner += [index] * len(windows)
    return Chunked(chunk_queries, chunk_passages, np.asarray(owner, dtype=np.int64), cut, windowed)


def best_of(scores: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Each input pair's best chunk score (``owner`` as ``split_long`` gives it); NaN where all are NaN."""
    if not len(scores):
        return scores
    return np.fmax.reduceat(scores, _starts(owner))  # fmax: a NaN loses to any number


def any_of(flags: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Each input pair's flag: true when any of its chunk pairs' is."""
    return np.logical_or.reduceat(flags, _starts(owner)) if len(flags) else flags.astype(bool)


def sum_of(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Each input pair's total over its chunk pairs (e.g. tokens)."""
    return np.add.reduceat(values, _starts(owner)) if len(values) else values


def _starts(owner: np.ndarray) -> np.ndarray:
    """Where each input pair's run of chunk pairs begins (``owner`` is non-decreasing)."""
    return np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])


def _rooms(
    encoder: PairEncoder, queries: Sequence[str], instruction: str | None, limit: int
) -> dict[str, int]:
    """Passage tokens each distinct query's pair leaves: ``limit`` less the pair with an empty passage."""
    unique = list(dict.fromkeys(queries))
    empty = encoder.tokenize(unique, [""] * len(unique), limit, instruction=instruction)
    return {query: int(limit - length) for query, length in zip(unique, empty.lengths, strict=True)}


def _windows(words: list[int | None], room: int, overlap: int, max_chunks: int) -> list[tuple[int, int]]:
    """Token spans ``[start, stop)`` of at most ``room`` tokens, about ``room - overlap`` apart.

    Spans end and start between words where that keeps them at least a step long; a word longer than
    that is cut. Every token up to the last span's end is in a span.
    """
    total, step = len(words), room - overlap
    spans: list[tuple[int, int]] = []
    start = 0
    while len(spans) < max_chunks:
        hard = min(start + room, total)
        stop = _word_end(words, start, hard)
        if stop - start < step:  # the words are too long to end between them: a hard cut
            stop = hard
        spans.append((start, stop))
        if stop >= total:
            break
        start = _word_start(words, max(start + 1, min(start + step, stop)), stop)
    return spans


def _word_end(words: list[int | None], start: int, stop: int) -> int:
    """``stop`` moved back so the span does not end inside a word (unless the span is one word)."""
    end = stop
    while end < len(words) and end > start + 1 and words[end] is not None and words[end] == words[end - 1]:
        end -= 1
    return end if end > start else stop


def _word_start(words: list[int | None], start: int, limit: int) -> int:
    """``start`` moved forward to a word's first token (at most to ``limit``, the previous span's end)."""
    begin = start
    while begin < limit and words[begin] is not None and words[begin] == words[begin - 1]:
        begin += 1
    return begin
