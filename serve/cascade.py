"""Ranking one request's documents through the configured stages (one stage without a cascade).

Each stage is a ``StageScorer``: the replica's own ``RerankEngine`` (a single model, or every stage of
a cascade in one replica), or a ``RemoteStage`` that calls a stage's own Serve deployment through its
handle. The stages' scores are raw logits; the order is ``reranker.cascade.cascade_order``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from reranker.cascade import cascade_order, top_candidates
from reranker.errors import RerankError
from serve.engine import DEFAULT_TRUNCATION, Scored, Truncation
from serve.errors import OverloadedError


class StageScorer(Protocol):
    """What ranking needs of one stage: raw logits for pairs, a health check, its max length."""

    @property
    def max_length(self) -> int: ...  # noqa: D102

    async def score(  # noqa: D102
        self, queries: Sequence[str], passages: Sequence[str], truncation: Truncation = ...
    ) -> Scored: ...

    async def health_check(self) -> None: ...  # noqa: D102


class RemoteStage:
    """A stage served by its own deployment, called through a Serve deployment handle."""

    def __init__(self, handle: Any, max_length: int) -> None:
        self.handle = handle
        self.max_length = max_length

    async def score(
        self, queries: Sequence[str], passages: Sequence[str], truncation: Truncation = DEFAULT_TRUNCATION
    ) -> Scored:
        """The stage deployment's scores; its domain errors (e.g. overload) come back as themselves.

        Raises:
            OverloadedError: The stage is overloaded (its queue, or Serve's backpressure).
        """
        try:
            scored: Scored = await self.handle.score.remote(list(queries), list(passages), truncation)
        except BackPressureError as exc:
            raise OverloadedError(f"a cascade stage is busy: {exc}") from None
        except RayTaskError as exc:
            if isinstance(exc.cause, RerankError):
                raise exc.cause from None
            raise
        return scored

    async def health_check(self) -> None:
        """Raise unless the stage deployment can score."""
        await self.handle.check_health.remote()


@dataclass(frozen=True)
class Ranked:
    """One request's documents ranked: order best first, final raw scores, and each stage's."""

    order: np.ndarray
    scores: np.ndarray  # the last stage each document reached (NaN: none)
    stage_scores: list[np.ndarray]  # one per stage, NaN where a document did not reach it
    num_tokens: int
    num_truncated: int


class CascadeRanker:
    """Runs a request's documents through the stages: every one through the first, the best k onwards."""

    def __init__(
        self, stages: Sequence[StageScorer], rerank_counts: Sequence[int], names: Sequence[str]
    ) -> None:
        self.stages = list(stages)
        self.rerank_counts = list(rerank_counts)  # one per stage but the last
        self.names = list(names)

    @property
    def max_length(self) -> int:
        """The shortest max length of the stages (what a truncation check must use)."""
        return min(stage.max_length for stage in self.stages)

    async def rank(
        self,
        query: str,
        documents: Sequence[str],
        truncation: Truncation = DEFAULT_TRUNCATION,
        rerank_count: int | None = None,
    ) -> Ranked:
        """Score the documents stage by stage; ``rerank_count`` replaces the k before the last stage."""
        counts = list(self.rerank_counts)
        if counts and rerank_count is not None:
            counts[-1] = rerank_count
        stage_scores = [np.full(len(documents), np.nan) for _ in self.stages]
        candidates = np.arange(len(documents))
        tokens = truncated = 0
        for number, stage in enumerate(self.stages):
            if number:
                previous = stage_scores[number - 1][candidates]
                candidates = candidates[top_candidates(previous, counts[number - 1])]
            texts = [documents[int(i)] for i in candidates]
            scored = await stage.score([query] * len(texts), texts, truncation)
            stage_scores[number][candidates] = scored.scores
            tokens, truncated = tokens + scored.num_tokens, truncated + scored.num_truncated
        order, final, _ = cascade_order(stage_scores)
        return Ranked(order, final.astype(np.float32), stage_scores, tokens, truncated)

    async def health_check(self) -> None:
        """Raise unless every stage can score."""
        for stage in self.stages:
            await stage.health_check()
