"""The engine between the routes and the model: a bounded FIFO batching queue and one model thread.

Requests are cut into chunks of at most ``max_batch_pairs`` pairs; ``BatchQueue`` coalesces the chunks
of concurrent requests into model batches of at most ``max_batch_pairs`` pairs, strictly in arrival
order, and every model call (tokenization included) runs on one dedicated thread, so the tokenizer is
never used from two threads and torch keeps a single, warm intra-op thread pool.

The engine returns raw logits whatever the model's ``activation`` setting: the routes apply the
activation their API defines. A batch that fails is retried one request at a time, so only the
request at fault gets the error. All state changes happen on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pydantic

from reranker.chunking import best_of
from reranker.errors import ConfigError
from reranker.types import TruncationSide
from serve.errors import OverloadedError, RequestValidationError
from serve.metrics import RerankMetrics

if TYPE_CHECKING:
    from reranker.model import CrossEncoderModel

logger = logging.getLogger("ray.serve")
HEALTH_PROBE_INTERVAL_S = 10.0  # /health and Serve's check run a forward pass at most this often


class BatchingConfig(pydantic.BaseModel):
    """The batching knobs in force in one engine (changed at run time through Serve's ``user_config``)."""

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
            raise ConfigError(_problems("user_config", exc)) from None


def _problems(where: str, exc: pydantic.ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return (
        f"{where}: {problems} (allowed: {sorted(BatchingConfig.model_fields)}, and stages: {{NAME: {{...}}}})"
    )


class BatchingOverrides(pydantic.BaseModel):
    """Batching keys a ``user_config`` sets; a key it leaves out keeps the value from the settings."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    max_batch_pairs: int | None = pydantic.Field(None, ge=1)
    batch_wait_timeout_s: float | None = pydantic.Field(None, ge=0)
    max_pending_pairs: int | None = pydantic.Field(None, ge=1)

    def changes(self, skip: Collection[str] = ()) -> dict[str, Any]:
        """The keys this sets, less ``skip``."""
        values = self.model_dump(include=set(BatchingOverrides.model_fields), exclude_none=True)
        return {key: value for key, value in values.items() if key not in skip}


class UserConfig(BatchingOverrides):
    """A deployment's ``user_config``: batching keys for every stage, and ``stages`` for one stage each.

    The layer above the settings (flags, ``RERANK_*``, args): a key applies where it is set, on top of
    the stage's settings. A top-level key applies to every stage except one whose cascade declaration
    sets that key itself; ``stages: {NAME: {...}}`` applies to that stage alone and wins over both.
    """

    stages: dict[str, BatchingOverrides] = pydantic.Field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, stage_names: Collection[str]) -> UserConfig:
        """Validate a ``user_config`` against the keys and the stage names it may use.

        Raises:
            ConfigError: An unknown key or stage, or an invalid value, named in the message.
        """
        try:
            parsed = cls.model_validate(dict(raw or {}))
        except pydantic.ValidationError as exc:
            raise ConfigError(_problems("user_config", exc)) from None
        unknown = sorted(set(parsed.stages) - set(stage_names))
        if unknown:
            raise ConfigError(f"user_config: stages: unknown {unknown} (the stages: {sorted(stage_names)})")
        return parsed

    def for_stage(self, base: BatchingConfig, name: str, own: Collection[str] = ()) -> BatchingConfig:
        """Stage ``name``'s batching: ``base`` (its settings), the top-level keys but ``own``, its entry.

        Raises:
            ConfigError: The result is invalid.
        """
        specific = self.stages.get(name) or BatchingOverrides.model_validate({})
        return base.updated({**self.changes(skip=own), **specific.changes()})


@dataclass(frozen=True)
class Truncation:
    """How one request's pairs are cut to fit."""

    max_passage_tokens: int | None = None
    side: TruncationSide = "right"
    max_query_tokens: int | None = None
    max_chunks: int | None = None  # over 1: a long passage scores as its best window (None: the model's)


DEFAULT_TRUNCATION = Truncation()


@dataclass(frozen=True)
class Chunk:
    """Up to ``max_batch_pairs`` pairs of one request, with that request's truncation and instruction."""

    queries: list[str]
    passages: list[str]
    truncation: Truncation
    instruction: str | None = None


@dataclass(frozen=True)
class Scored:
    """Raw logits of one chunk or request, with token accounting and which pairs were truncated."""

    scores: np.ndarray
    num_tokens: int
    truncated: np.ndarray  # bool per pair

    @property
    def num_truncated(self) -> int:
        """Pairs cut to fit."""
        return int(np.count_nonzero(self.truncated))


@dataclass
class _Waiting:
    """A queued chunk and the future its request awaits."""

    chunk: Chunk
    future: asyncio.Future[Scored | Exception]


class BatchQueue:
    """First in, first out batching of chunks into model batches of at most ``max_pairs`` pairs.

    A batch takes the queued chunks in arrival order while they fit; the first one that does not fit
    starts the next batch, so no chunk is passed over by later ones (Serve's ``serve.batch`` sends it
    to the back of its queue, where full-size chunks can wait behind small ones under mixed load). A
    chunk larger than ``max_pairs`` (cut before the cap was lowered) is a batch of its own. A batch
    waits up to ``wait_s`` for more chunks unless it is full; one batch runs at a time.
    """

    def __init__(self, run: Callable[[list[Chunk]], Awaitable[list[Scored | Exception]]]) -> None:
        self._run = run
        self.max_pairs, self.wait_s = 1, 0.0
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, chunk: Chunk) -> Scored | Exception:
        """Queue ``chunk``; its result (or the exception scoring it raised) once its batch ran."""
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        future: asyncio.Future[Scored | Exception] = loop.create_future()
        self._waiting.append(_Waiting(chunk, future))
        assert self._arrived is not None
        self._arrived.set()
        return await future

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the batching task on this loop; again if it ended, keeping what is queued on this loop."""
        worker = self._worker
        if worker is not None and not worker.done() and worker.get_loop() is loop:
            return
        if worker is not None and worker.get_loop() is not loop:
            self._waiting.clear()  # an earlier loop's requests (a closed loop): nobody awaits them here
        elif worker is not None and not worker.cancelled() and worker.exception() is not None:
            logger.error("the batching task stopped; restarting it", exc_info=worker.exception())
        self._arrived = asyncio.Event()
        if self._waiting:
            self._arrived.set()
        self._worker = loop.create_task(self._work())

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await self._run([item.chunk for item in batch])
            except Exception as exc:
                results = [exc] * len(batch)
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)

    async def _next_batch(self) -> list[_Waiting]:
        """The next batch in arrival order, once full or its wait is over (requests that left: dropped)."""
        assert self._arrived is not None
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        batch, deadline = [self._waiting.popleft()], loop.time() + self.wait_s
        pairs = len(batch[0].chunk.queries)
        while True:
            while self._waiting and pairs + len(self._waiting[0].chunk.queries) <= self.max_pairs:
                batch.append(self._waiting.popleft())
                pairs += len(batch[-1].chunk.queries)
            if pairs >= self.max_pairs or self._waiting or loop.time() >= deadline:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
        return [item for item in batch if not item.future.cancelled()]


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
    """Admission control, batching and scoring for one replica (one stage of a cascade)."""

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
        self.base = batching  # from the settings: what a user_config's keys apply on top of
        self.config_refused: str | None = None  # why the last user_config was refused, if it was
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-model")
        self.pending_pairs = 0
        self.queue = BatchQueue(self._run_batch)
        self.health = HealthCheck(self._probe, health_interval_s)
        self.configure(batching)

    @property
    def max_length(self) -> int:
        """Tokens per pair the model keeps."""
        return self.model.max_length

    def configure(self, batching: BatchingConfig) -> None:
        """Apply batching settings (from ``user_config``) without a restart; call on the event loop.

        Chunks already queued were cut at the old ``max_batch_pairs``: each larger one is a batch of
        its own, and forward passes follow the new cap at once.
        """
        self.batching: BatchingConfig = batching
        self.queue.max_pairs, self.queue.wait_s = batching.max_batch_pairs, batching.batch_wait_timeout_s

    def refuse_config(self, reason: str) -> None:
        """Record (log, metric, ``/health``) that a ``user_config`` was refused; the settings stay."""
        self.config_refused = reason
        logger.error("stage %s keeps its batching settings; refused %s", self.stage, reason)
        if self.metrics is not None:
            self.metrics.config_refused.inc(tags={"stage": self.stage})

    async def score(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        truncation: Truncation = Truncation(),
        instruction: str | None = None,
    ) -> Scored:
        """Score pairs through the shared batching queue; raw logits in input order.

        ``instruction`` (None: the model's setting) reaches a model that takes one (``accepts_instruction``).
        With ``truncation.max_chunks`` (or the model's ``max_chunks_per_doc``) over 1, a passage too long
        for its pair is scored as its best window (``reranker.chunking``): the windows are pairs of this
        request in the queue, so they ride the same token-budget batches and count against its bound.

        Raises:
            OverloadedError: The replica already holds ``max_pending_pairs`` pairs.
            RequestValidationError: A request's windows alone are more than ``max_pending_pairs``.
            Exception: Scoring this request's pairs failed (other requests in its batch are unaffected).

        """
        max_chunks = truncation.max_chunks or self.model.settings.max_chunks_per_doc
        if max_chunks == 1:
            return await self._score_pairs(queries, passages, truncation, instruction)
        loop = asyncio.get_running_loop()
        split = await loop.run_in_executor(  # the model thread: the only one that uses the tokenizer
            self._executor,
            self.model.split_long,
            queries,
            passages,
            max_chunks,
            instruction,
            truncation.max_passage_tokens,
            truncation.max_query_tokens,
        )
        windows, limit = len(split.queries), self.batching.max_pending_pairs
        if windows > max(limit, len(queries)):  # the windows alone would overflow even an idle replica
            raise RequestValidationError(
                f"max_chunks_per_doc: the documents make {windows} windows to score; this replica holds "
                f"{limit} pairs at most (ask for fewer windows or send fewer documents)"
            )
        scored = await self._score_pairs(split.queries, split.passages, truncation, instruction)
        return Scored(
            best_of(scored.scores, split.owner), scored.num_tokens, split.truncated(scored.truncated)
        )

    async def _score_pairs(
        self, queries: Sequence[str], passages: Sequence[str], truncation: Truncation, instruction: str | None
    ) -> Scored:
        count, limit = len(queries), self.batching.max_pending_pairs
        if self.pending_pairs and self.pending_pairs + count > limit:
            raise OverloadedError(f"server busy: {self.pending_pairs} pairs queued (limit {limit})")
        step = self.batching.max_batch_pairs
        chunks = [
            Chunk(list(queries[i : i + step]), list(passages[i : i + step]), truncation, instruction)
            for i in range(0, count, step)
        ]
        self._pending(count)
        try:
            parts: list[Scored | Exception] = await asyncio.gather(*map(self.queue.submit, chunks))
        finally:
            self._pending(-count)
        scored = [part for part in parts if not isinstance(part, Exception)]
        if len(scored) < len(parts):
            raise next(part for part in parts if isinstance(part, Exception))
        return Scored(
            scores=np.concatenate([part.scores for part in scored]),
            num_tokens=sum(part.num_tokens for part in scored),
            truncated=np.concatenate([part.truncated for part in scored]),
        )

    def _pending(self, change: int) -> None:
        """Admit (or release) ``change`` pairs, and export the queue depth."""
        self.pending_pairs += change
        if self.metrics is not None:
            self.metrics.pending_pairs.set(self.pending_pairs, tags={"stage": self.stage})

    async def _run_batch(self, chunks: list[Chunk]) -> list[Scored | Exception]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._score_batch, chunks)
        if any(not isinstance(result, Exception) for result in results):
            self.health.passed()
        return results

    def _score_batch(self, chunks: list[Chunk]) -> list[Scored | Exception]:
        """One model batch per preparation (truncation, instruction); a failed one, chunk by chunk."""
        results: dict[int, Scored | Exception] = {}
        for members in _by_preparation(chunks):
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
        """Score the chunks ``members`` (one truncation and instruction) as one model batch."""
        truncation, instruction = chunks[members[0]].truncation, chunks[members[0]].instruction
        queries = [q for i in members for q in chunks[i].queries]
        passages = [p for i in members for p in chunks[i].passages]
        encoded = self.model.tokenize(
            queries,
            passages,
            truncation_side=truncation.side,
            max_passage_tokens=truncation.max_passage_tokens,
            instruction=instruction,
            max_query_tokens=truncation.max_query_tokens,
        )
        scores = self.model.score_encoded(
            encoded, max_batch_pairs=self.batching.max_batch_pairs, activation="none"
        )
        self._record_batch(len(members), len(queries), int(encoded.lengths.sum()), encoded.truncated)
        results, offset = {}, 0
        for i in members:
            window = slice(offset, offset + len(chunks[i].queries))
            results[i] = Scored(
                scores[window],
                int(encoded.lengths[window].sum()),
                np.asarray(encoded.truncated[window], bool),
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

    async def accepts_instruction(self) -> bool:
        """Whether the model takes an instruction (an LLM reranker's prompt)."""
        return bool(self.model.takes_instruction)

    async def kind(self) -> str:
        """What kind of reranker the model is (``CrossEncoderModel.kind``)."""
        return str(self.model.kind)

    async def health_check(self) -> str | None:
        """Raise unless the model scored a batch or a probe within the health interval.

        Serve calls it every ``health_check_period_s``: it also re-exports the queue depth, a gauge Ray
        stops exporting when it is not set for two report intervals.

        Returns:
            Why the last ``user_config`` was refused, if it was (the settings in force stayed).
        """
        self._pending(0)
        await self.health.check()
        return self.config_refused

    async def _probe(self) -> None:
        """Score one probe pair on the model thread; raise if the model can't score."""
        loop = asyncio.get_running_loop()
        probe = functools.partial(self.model.score, ["health"], ["check"], activation="none")
        result = await loop.run_in_executor(self._executor, probe)
        if not math.isfinite(float(result.scores[0])):
            raise RuntimeError("model returned a non-finite score for the health probe")


def _by_preparation(chunks: list[Chunk]) -> list[list[int]]:
    """Chunk indices grouped by how their pairs are prepared (one model batch each)."""
    order = sorted(range(len(chunks)), key=lambda i: _sort_key(chunks[i]))
    return [list(group) for _, group in itertools.groupby(order, key=lambda i: _sort_key(chunks[i]))]


def _sort_key(chunk: Chunk) -> tuple[int, int, str, str, bool]:
    truncation = chunk.truncation
    return (
        truncation.max_passage_tokens or 0,
        truncation.max_query_tokens or 0,
        truncation.side,
        chunk.instruction or "",
        chunk.instruction is None,
    )
