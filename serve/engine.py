"""The engine between the routes and the model: a bounded batching queue and one model thread.

Requests are cut into chunks of at most ``max_batch_pairs`` pairs; ``serve.batch`` coalesces the
chunks of concurrent requests into model batches measured in pairs (``batch_size_fn``), and every
model call runs on one dedicated thread so torch keeps a single, warm intra-op thread pool.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ray import serve

from reranker.errors import OverloadedError
from reranker.model import CrossEncoderModel, TruncationSide
from serve.metrics import RerankMetrics


@dataclass(frozen=True)
class Chunk:
    """Up to ``max_batch_pairs`` pairs of one request, with that request's truncation."""

    queries: list[str]
    passages: list[str]
    max_length: int | None
    truncation_side: TruncationSide


@dataclass(frozen=True)
class Scored:
    """Raw logits of one chunk or request, with accounting and the batch it rode in."""

    scores: np.ndarray
    num_tokens: int
    num_truncated: int
    batch_requests: int
    batch_pairs: int


def _pairs_in(chunks: list[Chunk]) -> int:
    return sum(len(chunk.queries) for chunk in chunks)


class RerankEngine:
    """Admission control, batching and scoring for one replica."""

    def __init__(self, model: CrossEncoderModel, metrics: RerankMetrics | None = None) -> None:
        self.model = model
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-model")
        self.max_batch_pairs = 256
        self.max_pending_pairs = 8192
        self.pending_pairs = 0

    def configure(self, max_batch_pairs: int, batch_wait_timeout_s: float, max_pending_pairs: int) -> None:
        """Apply batching settings (from ``user_config``) without a restart."""
        self.max_batch_pairs = max_batch_pairs
        self.max_pending_pairs = max_pending_pairs
        self._score_chunks.set_max_batch_size(max_batch_pairs)  # type: ignore[attr-defined]
        self._score_chunks.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    async def score(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        max_length: int | None = None,
        truncation_side: TruncationSide = "right",
    ) -> Scored:
        """Score pairs through the shared batching queue; raw logits in input order.

        Raises:
            OverloadedError: The replica already holds ``max_pending_pairs`` pairs.

        """
        count = len(queries)
        if self.pending_pairs and self.pending_pairs + count > self.max_pending_pairs:
            raise OverloadedError(
                f"server busy: {self.pending_pairs} pairs queued (limit {self.max_pending_pairs})"
            )
        self.pending_pairs += count
        try:
            step = self.max_batch_pairs
            chunks = [
                Chunk(list(queries[i : i + step]), list(passages[i : i + step]), max_length, truncation_side)
                for i in range(0, count, step)
            ]
            parts: list[Scored] = await asyncio.gather(*(self._score_chunks(chunk) for chunk in chunks))
        finally:
            self.pending_pairs -= count
        return Scored(
            scores=np.concatenate([part.scores for part in parts]),
            num_tokens=sum(part.num_tokens for part in parts),
            num_truncated=sum(part.num_truncated for part in parts),
            batch_requests=max(part.batch_requests for part in parts),
            batch_pairs=max(part.batch_pairs for part in parts),
        )

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.0, batch_size_fn=_pairs_in)
    async def _score_chunks(self, chunks: list[Chunk]) -> list[Scored]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._score_batch, chunks)

    def _score_batch(self, chunks: list[Chunk]) -> list[Scored]:
        """One model batch per truncation setting; results split back per chunk."""
        results: dict[int, Scored] = {}
        by_truncation = itertools.groupby(
            sorted(range(len(chunks)), key=lambda i: _truncation_key(chunks[i])),
            key=lambda i: _truncation_key(chunks[i]),
        )
        for (max_length, side), group in by_truncation:
            members = list(group)
            queries = [q for i in members for q in chunks[i].queries]
            passages = [p for i in members for p in chunks[i].passages]
            encoded = self.model.tokenize(queries, passages, max_length, side)
            scores = self.model.score_encoded(encoded)
            self._record_batch(len(members), len(queries), int(encoded.lengths.sum()), encoded.truncated)
            offset = 0
            for i in members:
                size = len(chunks[i].queries)
                window = slice(offset, offset + size)
                results[i] = Scored(
                    scores[window],
                    int(encoded.lengths[window].sum()),
                    int(encoded.truncated[window].sum()),
                    len(members),
                    len(queries),
                )
                offset += size
        return [results[i] for i in range(len(chunks))]

    def _record_batch(self, requests: int, pairs: int, tokens: int, truncated: np.ndarray) -> None:
        if self.metrics is None:
            return
        self.metrics.batch_requests.observe(requests)
        self.metrics.batch_pairs.observe(pairs)
        self.metrics.pairs.inc(pairs)
        self.metrics.tokens.inc(tokens)
        if truncated.any():  # Ray counters reject increments of 0
            self.metrics.truncated.inc(int(truncated.sum()))

    async def health_check(self) -> None:
        """Score a probe pair on the model thread; raise if the model can't score."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self.model.score, ["health"], ["check"])
        if not math.isfinite(float(result.scores[0])):
            raise RuntimeError("model returned a non-finite score for the health probe")


def _truncation_key(chunk: Chunk) -> tuple[int, TruncationSide]:
    return (chunk.max_length or 0, chunk.truncation_side)
