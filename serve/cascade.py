"""Ranking one request's documents through the configured stages (one stage without a cascade).

Each stage is a ``StageScorer``: the replica's own ``RerankEngine`` (a single model, or every stage of
a cascade in one replica), or a ``RemoteStage`` that calls a stage's own Serve deployment through its
handle. The stages' scores are raw logits; the order is ``reranker.cascade.cascade_order``, and the
reported scores follow it (``reranker.cascade.monotone_scores``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError

from reranker.cascade import cascade_order, monotone_scores, top_candidates
from reranker.errors import RerankError
from serve.engine import DEFAULT_TRUNCATION, Scored, Truncation
from serve.errors import OverloadedError, ReplicaLostError, RequestValidationError

logger = logging.getLogger("ray.serve")
REPLICA_LOSS = (ActorDiedError, ActorUnavailableError)  # a stage replica gone, or unreachable


class StageScorer(Protocol):
    """What ranking needs of one stage: raw logits for pairs, its health, its max length."""

    @property
    def max_length(self) -> int: ...  # noqa: D102

    async def score(  # noqa: D102
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        truncation: Truncation = ...,
        instruction: str | None = ...,
    ) -> Scored: ...

    async def accepts_instruction(self) -> bool: ...  # noqa: D102

    async def kind(self) -> str: ...  # noqa: D102

    async def health_check(self) -> str | None: ...  # noqa: D102  # returns a refused user_config


class RemoteStage:
    """A stage served by its own deployment, called through a Serve deployment handle."""

    def __init__(self, handle: Any, max_length: int, name: str = "stage") -> None:
        self.handle = handle
        self.max_length = max_length
        self.name = name
        self._takes_instruction: bool | None = None  # asked of the stage once

    async def accepts_instruction(self) -> bool:
        """Whether the stage's model takes an instruction (asked of its deployment once)."""
        if self._takes_instruction is None:
            self._takes_instruction = bool(await self.handle.accepts_instruction.remote())
        return self._takes_instruction

    async def kind(self) -> str:
        """What kind of reranker the stage's model is (asked of its deployment)."""
        return str(await self.handle.kind.remote())

    async def score(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        truncation: Truncation = DEFAULT_TRUNCATION,
        instruction: str | None = None,
    ) -> Scored:
        """The stage deployment's scores; its domain errors (e.g. overload) come back as themselves.

        A call whose replica died (or can't be reached) is sent once more: the handle's router has
        dropped that replica by then. Scoring is idempotent.

        Raises:
            OverloadedError: The stage is overloaded (its queue, or Serve's backpressure).
            ReplicaLostError: The stage's replica was lost on both tries.
        """
        for attempt in (1, 2):
            try:
                return await self._call(list(queries), list(passages), truncation, instruction)
            except REPLICA_LOSS as exc:
                logger.warning("stage %s lost its replica (try %d of 2): %s", self.name, attempt,
                               type(exc).__name__)  # fmt: skip
        raise ReplicaLostError(f"the replica of cascade stage {self.name} stopped; retry the request")

    async def _call(
        self, queries: list[str], passages: list[str], truncation: Truncation, instruction: str | None
    ) -> Scored:
        try:
            scored: Scored = await self.handle.score.remote(queries, passages, truncation, instruction)
        except BackPressureError as exc:
            raise OverloadedError(f"a cascade stage is busy: {exc}") from None
        except RayTaskError as exc:
            if isinstance(exc.cause, RerankError):
                raise exc.cause from None
            raise
        return scored

    async def health_check(self) -> str | None:
        """Raise unless the stage deployment can score; why it refused its last ``user_config``, if it did.

        One call to one of its replicas (``RerankStage.health``).
        """
        refused: str | None = await self.handle.health.remote()
        return refused


@dataclass(frozen=True)
class Ranked:
    """One request's documents ranked: order best first, reported raw scores, and each stage's."""

    order: np.ndarray
    scores: np.ndarray  # raw, never increasing along ``order`` (NaN: none)
    stage_scores: list[np.ndarray]  # one per stage, NaN where a document did not reach it
    num_tokens: int
    truncated: np.ndarray  # bool per document: cut to fit at any stage

    @property
    def num_truncated(self) -> int:
        """Documents cut to fit (each counted once, whatever the stages that cut it)."""
        return int(np.count_nonzero(self.truncated))


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
        instruction: str | None = None,
    ) -> Ranked:
        """Score the documents stage by stage; ``rerank_count`` replaces the k before the last stage.

        ``instruction`` goes to each stage whose model takes one (an LLM stage behind a BERT one).

        Raises:
            RequestValidationError: An instruction, and no stage takes one.
        """
        instructions = await self.instructions(instruction)
        counts = list(self.rerank_counts)
        if counts and rerank_count is not None:
            counts[-1] = rerank_count
        stage_scores = [np.full(len(documents), np.nan) for _ in self.stages]
        candidates = np.arange(len(documents))
        tokens, truncated = 0, np.zeros(len(documents), dtype=bool)
        for number, stage in enumerate(self.stages):
            if number:
                previous = stage_scores[number - 1][candidates]
                candidates = candidates[top_candidates(previous, counts[number - 1])]
            texts = [documents[int(i)] for i in candidates]
            scored = await stage.score([query] * len(texts), texts, truncation, instructions[number])
            stage_scores[number][candidates] = scored.scores
            tokens += scored.num_tokens
            truncated[candidates] |= scored.truncated
        order, final, reached = cascade_order(stage_scores)
        return Ranked(order, monotone_scores(order, final, reached), stage_scores, tokens, truncated)

    async def instructions(self, instruction: str | None) -> list[str | None]:
        """The request's instruction for each stage: to those that take one.

        Raises:
            RequestValidationError: An instruction, and no stage takes one.
        """
        if instruction is None:
            return [None] * len(self.stages)
        takes = [await stage.accepts_instruction() for stage in self.stages]
        if not any(takes):
            raise RequestValidationError("instruction: the served model takes none (not an LLM reranker)")
        return [instruction if accepted else None for accepted in takes]

    async def health_check(self) -> dict[str, str]:
        """Raise unless every stage can score.

        Returns:
            Each stage's refused ``user_config``, by stage name (empty when none was refused).
        """
        refused = {
            name: await stage.health_check() for name, stage in zip(self.names, self.stages, strict=True)
        }
        return {name: reason for name, reason in refused.items() if reason}
