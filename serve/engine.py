"""The engine between the routes and the model: a bounded batching queue and one model thread.

Requests are cut into chunks of at most ``max_batch_pairs`` pairs; ``serve.batch`` coalesces the
chunks of concurrent requests into model batches measured in pairs (``batch_size_fn``), and every
model call (tokenization included) runs on one dedicated thread, so the tokenizer is never used
from two threads and torch keeps a single, warm intra-op thread pool.

The engine returns raw logits whatever the model's ``activation`` setting: the routes apply the
activation their API defines. A batch that fails is retried one request at a time, so only the
request at fault gets the error. All state changes happen on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pydantic
from ray import serve

from reranker.errors import ConfigError
from reranker.types import TruncationSide
from serve.errors import OverloadedError
from serve.metrics import RerankMetrics

if TYPE_CHECKING:
    from reranker.model import CrossEncoderModel

logger = logging.getLogger("ray.serve")
HEALTH_PROBE_INTERVAL_S = 10.0  # /health and Serve's check run a forward pass at most this often


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


DEFAULT_TRUNCATION = Truncation()


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


class HealthCheck:
    """The replica's health: a real batch that scored counts as a check, else a probe at most per interval.

    Concurrent checks share one probe, so ``/health`` and Serve's health check cannot queue forward
    passes beside the requests.
    """

    def __init__(self, probe: Callable[[], Awaitable[None]], interval_s: float) -> None:
        self._probe = probe
        self.interval_s = interval_s
        self._checked_at = -math.inf
        self._error: str | None = None
        self._running: asyncio.Future[None] | None = None

    def passed(self) -> None:
        """Record that the model just scored a real batch."""
        self._checked_at, self._error = time.monotonic(), None

    async def check(self) -> None:
        """Return if the model scored within the interval, else probe it once (shared).

        Raises:
            RuntimeError: The model could not score the last probe.
        """
        if time.monotonic() - self._checked_at >= self.interval_s:
            if self._running is None:
                self._running = asyncio.ensure_future(self._run_probe())
            await asyncio.shield(self._running)
        if self._error is not None:
            raise RuntimeError(f"model cannot score: {self._error}")

    async def _run_probe(self) -> None:
        try:
            await self._probe()
            self._error = None
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
        finally:
            self._checked_at, self._running = time.monotonic(), None


class RerankEngine:
    """Admission control, batching and scoring for one replica."""

    def __init__(
        self,
        model: CrossEncoderModel,
        batching: BatchingConfig,
        metrics: RerankMetrics | None = None,
        health_interval_s: float = HEALTH_PROBE_INTERVAL_S,
        stage: str = "stage1",
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.stage = stage  # the metrics' stage tag (a cascade's stage name)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-model")
        self.pending_pairs = 0
        self._chunk_sizes: collections.Counter[int] = collections.Counter()  # queued or in flight
        self._queue_limit = 0
        # One batching queue per engine (serve.batch on a class method would share one across instances).
        self._score_chunks = serve.batch(batch_size_fn=_pairs_in)(self._run_batch)
        self.health = HealthCheck(self._probe, health_interval_s)
        self.configure(batching)

    @property
    def max_length(self) -> int:
        """Tokens per pair the model keeps."""
        return self.model.max_length

    def configure(self, batching: BatchingConfig) -> None:
        """Apply batching settings (from ``user_config``) without a restart; call on the event loop.

        Chunks already queued were cut at the old ``max_batch_pairs``: the queue keeps admitting
        chunks that large until they have drained, and forward passes follow the new cap at once.
        """
        self.batching: BatchingConfig = batching
        self._score_chunks.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._update_queue_limit()

    def _update_queue_limit(self) -> None:
        limit = max(self.batching.max_batch_pairs, max(self._chunk_sizes, default=0))
        if limit != self._queue_limit:
            self._queue_limit = limit
            self._score_chunks.set_max_batch_size(limit)  # type: ignore[attr-defined]

    def _hold(self, chunks: Sequence[Chunk], held: bool) -> None:
        """Count (or release) the sizes of a request's chunks while they are queued or scored."""
        for chunk in chunks:
            size = len(chunk.queries)
            self._chunk_sizes[size] += 1 if held else -1
            if self._chunk_sizes[size] <= 0:
                del self._chunk_sizes[size]
        if not held:
            self._update_queue_limit()

    async def score(
        self, queries: Sequence[str], passages: Sequence[str], truncation: Truncation = Truncation()
    ) -> Scored:
        """Score pairs through the shared batching queue; raw logits in input order.

        Raises:
            OverloadedError: The replica already holds ``max_pending_pairs`` pairs.
            Exception: Scoring this request's pairs failed (other requests in its batch are unaffected).

        """
        count, limit = len(queries), self.batching.max_pending_pairs
        if self.pending_pairs and self.pending_pairs + count > limit:
            raise OverloadedError(f"server busy: {self.pending_pairs} pairs queued (limit {limit})")
        step = self.batching.max_batch_pairs
        chunks = [
            Chunk(list(queries[i : i + step]), list(passages[i : i + step]), truncation)
            for i in range(0, count, step)
        ]
        self.pending_pairs += count
        self._hold(chunks, held=True)
        try:
            parts: list[Scored | Exception] = await asyncio.gather(*map(self._score_chunks, chunks))
        finally:
            self.pending_pairs -= count
            self._hold(chunks, held=False)
        scored = [part for part in parts if not isinstance(part, Exception)]
        if len(scored) < len(parts):
            raise next(part for part in parts if isinstance(part, Exception))
        return Scored(
            scores=np.concatenate([part.scores for part in scored]),
            num_tokens=sum(part.num_tokens for part in scored),
            num_truncated=sum(part.num_truncated for part in scored),
        )

    async def _run_batch(self, chunks: list[Chunk]) -> list[Scored | Exception]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._score_batch, chunks)
        if any(not isinstance(result, Exception) for result in results):
            self.health.passed()
        return results

    def _score_batch(self, chunks: list[Chunk]) -> list[Scored | Exception]:
        """One model batch per truncation setting; a failed batch is retried one chunk at a time."""
        results: dict[int, Scored | Exception] = {}
        for members in _by_truncation(chunks):
            try:
                results.update(self._score_together(chunks, members))
            except Exception as exc:
                if len(members) == 1:
                    results[members[0]] = exc
                    continue
                logger.warning("a batch of %d chunks failed (%s); scoring each alone", len(members), exc)
                for i in members:
                    try:
                        results.update(self._score_together(chunks, [i]))
                    except Exception as member_exc:
                        results[i] = member_exc
        return [results[i] for i in range(len(chunks))]

    def _score_together(self, chunks: list[Chunk], members: list[int]) -> dict[int, Scored]:
        """Score the chunks ``members`` (one truncation setting) as one model batch."""
        truncation = chunks[members[0]].truncation
        queries = [q for i in members for q in chunks[i].queries]
        passages = [p for i in members for p in chunks[i].passages]
        encoded = self.model.tokenize(
            queries,
            passages,
            truncation_side=truncation.side,
            max_passage_tokens=truncation.max_passage_tokens,
        )
        scores = self.model.score_encoded(
            encoded, max_batch_pairs=self.batching.max_batch_pairs, activation="none"
        )
        self._record_batch(len(members), len(queries), int(encoded.lengths.sum()), encoded.truncated)
        results, offset = {}, 0
        for i in members:
            window = slice(offset, offset + len(chunks[i].queries))
            results[i] = Scored(
                scores[window], int(encoded.lengths[window].sum()), int(encoded.truncated[window].sum())
            )
            offset = window.stop
        return results

    def _record_batch(self, requests: int, pairs: int, tokens: int, truncated: np.ndarray) -> None:
        if self.metrics is None:
            return
        tags = {"stage": self.stage}
        self.metrics.batch_requests.observe(requests, tags=tags)
        self.metrics.batch_pairs.observe(pairs, tags=tags)
        self.metrics.pairs.inc(pairs, tags=tags)
        self.metrics.tokens.inc(tokens, tags=tags)
        if truncated.any():  # Ray counters reject increments of 0
            self.metrics.truncated.inc(int(truncated.sum()), tags=tags)

    async def health_check(self) -> None:
        """Raise unless the model scored a batch or a probe within the health interval."""
        await self.health.check()

    async def _probe(self) -> None:
        """Score one probe pair on the model thread; raise if the model can't score."""
        loop = asyncio.get_running_loop()
        probe = functools.partial(self.model.score, ["health"], ["check"], activation="none")
        result = await loop.run_in_executor(self._executor, probe)
        if not math.isfinite(float(result.scores[0])):
            raise RuntimeError("model returned a non-finite score for the health probe")


def _by_truncation(chunks: list[Chunk]) -> list[list[int]]:
    """Chunk indices grouped by truncation setting (one model batch each)."""
    order = sorted(range(len(chunks)), key=lambda i: _sort_key(chunks[i].truncation))
    return [list(group) for _, group in itertools.groupby(order, key=lambda i: chunks[i].truncation)]


def _sort_key(truncation: Truncation) -> tuple[int, str]:
    return (truncation.max_passage_tokens or 0, truncation.side)
