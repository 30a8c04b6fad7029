"""The engine between the routes and the model: a bounded batching queue and one model thread.

Requests are cut into chunks of at most ``max_batch_pairs`` pairs; ``serve.batch`` coalesces the
chunks of concurrent requests into model batches measured in pairs (``batch_size_fn``), and every
model call (tokenization included) runs on one dedicated thread, so the tokenizer is never used
from two threads and torch keeps a single, warm intra-op thread pool.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydantic
from ray import serve

from reranker.errors import ConfigError
from reranker.model import CrossEncoderModel
from reranker.types import TruncationSide
from serve.errors import OverloadedError
from serve.metrics import RerankMetrics


class BatchingConfig(pydantic.BaseModel):
    """The batching knobs a replica changes at run time (Serve's ``user_config``)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    max_batch_pairs: int = pydantic.Field(ge=1)
    batch_wait_timeout_s: float = pydantic.Field(ge=0)
    max_pending_pairs: int = pydantic.Field(ge=1)

    def updated(self, changes: Mapping[str, Any]) -> BatchingConfig:
        """A copy with ``changes`` applied and validated.

        Raises:
            ConfigError: An unknown key or an invalid value, named in the message.
        """
        try:
            return BatchingConfig.model_validate({**self.model_dump(), **changes})
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(
                f"user_config: {problems} (allowed: {sorted(BatchingConfig.model_fields)})"
            ) from None


@dataclass(frozen=True)
class Truncation:
    """How one request's pairs are cut to fit."""

    max_passage_tokens: int | None = None
    side: TruncationSide = "right"


@dataclass(frozen=True)
class Chunk:
    """Up to ``max_batch_pairs`` pairs of one request, with that request's truncation."""

    queries: list[str]
    passages: list[str]
    truncation: Truncation


@dataclass(frozen=True)
class Scored:
    """Raw logits of one chunk or request, with token accounting."""

    scores: np.ndarray
    num_tokens: int
    num_truncated: int


def _pairs_in(chunks: list[Chunk]) -> int:
    return sum(len(chunk.queries) for chunk in chunks)


class RerankEngine:
    """Admission control, batching and scoring for one replica."""

    def __init__(
        self, model: CrossEncoderModel, batching: BatchingConfig, metrics: RerankMetrics | None = None
    ) -> None:
        self.model = model
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-model")
        self.pending_pairs = 0
        # One batching queue per engine (serve.batch on a class method would share one across instances).
        self._score_chunks = serve.batch(batch_size_fn=_pairs_in)(self._run_batch)
        self.configure(batching)

    @property
    def max_length(self) -> int:
        """Tokens per pair the model keeps."""
        return self.model.max_length

    def configure(self, batching: BatchingConfig) -> None:
        """Apply batching settings (from ``user_config``) without a restart."""
        self.batching: BatchingConfig = batching
        self._score_chunks.set_max_batch_size(batching.max_batch_pairs)  # type: ignore[attr-defined]
        self._score_chunks.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)  # type: ignore[attr-defined]

    async def score(
        self, queries: Sequence[str], passages: Sequence[str], truncation: Truncation = Truncation()
    ) -> Scored:
        """Score pairs through the shared batching queue; raw logits in input order.

        Raises:
            OverloadedError: The replica already holds ``max_pending_pairs`` pairs.

        """
        count, limit = len(queries), self.batching.max_pending_pairs
        if self.pending_pairs and self.pending_pairs + count > limit:
            raise OverloadedError(f"server busy: {self.pending_pairs} pairs queued (limit {limit})")
        self.pending_pairs += count
        try:
            step = self.batching.max_batch_pairs
            chunks = [
                Chunk(list(queries[i : i + step]), list(passages[i : i + step]), truncation)
                for i in range(0, count, step)
            ]
            parts: list[Scored] = await asyncio.gather(*(self._score_chunks(chunk) for chunk in chunks))
        finally:
            self.pending_pairs -= count
        return Scored(
            scores=np.concatenate([part.scores for part in parts]),
            num_tokens=sum(part.num_tokens for part in parts),
            num_truncated=sum(part.num_truncated for part in parts),
        )

    async def _run_batch(self, chunks: list[Chunk]) -> list[Scored]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._score_batch, chunks)

    def _score_batch(self, chunks: list[Chunk]) -> list[Scored]:
        """One model batch per truncation setting; results split back per chunk."""
        results: dict[int, Scored] = {}
        by_truncation = itertools.groupby(
            sorted(range(len(chunks)), key=lambda i: _sort_key(chunks[i].truncation)),
            key=lambda i: chunks[i].truncation,
        )
        for truncation, group in by_truncation:
            members = list(group)
            queries = [q for i in members for q in chunks[i].queries]
            passages = [p for i in members for p in chunks[i].passages]
            encoded = self.model.tokenize(
                queries,
                passages,
                truncation_side=truncation.side,
                max_passage_tokens=truncation.max_passage_tokens,
            )
            scores = self.model.score_encoded(encoded, max_batch_pairs=self.batching.max_batch_pairs)
            self._record_batch(len(members), len(queries), int(encoded.lengths.sum()), encoded.truncated)
            offset = 0
            for i in members:
                window = slice(offset, offset + len(chunks[i].queries))
                results[i] = Scored(
                    scores[window], int(encoded.lengths[window].sum()), int(encoded.truncated[window].sum())
                )
                offset = window.stop
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


def _sort_key(truncation: Truncation) -> tuple[int, str]:
    return (truncation.max_passage_tokens or 0, truncation.side)
