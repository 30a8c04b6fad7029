"""The one request core: every API dialect's request becomes a ``RerankCall`` or a ``ScoreCall``.

Here, and only here, a request is checked against the deployment (model name, limits, instruction),
counted, cut to fit, ranked through the stages (``serve.cascade``) and answered with raw logits. Each
dialect (``serve.dialects``) only translates its body into a call and the answer back into its own
shape, applying its own activation (``activation``).

No HTTP here: what goes wrong is a domain error (``serve.errors``) that the edge (``serve.api``)
answers in the one error shape, with the status each dialect's clients expect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from reranker.cascade import stage_names
from reranker.scores import sigmoid
from serve.cascade import CascadeRanker, Ranked, StageScorer
from serve.engine import DEFAULT_TRUNCATION, Truncation
from serve.errors import ModelNotFoundError, PayloadTooLargeError, RequestValidationError
from serve.metrics import RerankMetrics
from serve.schemas import RequestLimits
from serve.settings import ServeSettings

Activation = Callable[[np.ndarray], np.ndarray]


def identity(scores: np.ndarray) -> np.ndarray:
    """Raw logits, as they are."""
    return scores


def activation(raw: bool) -> Activation:
    """The scores a dialect reports: raw logits, or their sigmoid (a relevance in [0, 1])."""
    return identity if raw else sigmoid


@dataclass(frozen=True)
class RerankCall:
    """One rerank request, whatever its dialect: a query, its documents and how to rank them."""

    route: str  # the metrics label of the dialect and route
    query: str
    documents: Sequence[str]
    top_n: int | None = None  # None: every document
    model: str | None = None
    truncation: Truncation = DEFAULT_TRUNCATION
    truncate: bool = True  # False: a document cut to fit is refused (413) instead of scored
    truncate_off: str = "truncate is false"  # how the dialect said so, in the refusal
    rerank_count: int | None = None
    instruction: str | None = None
    documents_field: str = "documents"  # the dialect's name for them, in error messages


@dataclass(frozen=True)
class ScoreCall:
    """Pairs to score in order (the ``/score`` dialects)."""

    route: str
    queries: Sequence[str]
    passages: Sequence[str]
    model: str | None = None
    truncation: Truncation = DEFAULT_TRUNCATION
    instruction: str | None = None


@dataclass(frozen=True)
class Hit:
    """One ranked document: its index in the request and its raw score."""

    index: int
    score: float


@dataclass(frozen=True)
class RerankAnswer:
    """A rerank call's answer: its best ``top_n`` documents, best first, with token accounting."""

    ranked: Ranked
    top_n: int | None
    stage_names: Sequence[str]

    @property
    def num_tokens(self) -> int:
        """Tokens fed to the models for this request (every stage)."""
        return self.ranked.num_tokens

    @property
    def num_truncated(self) -> int:
        """Documents cut to fit (at any stage)."""
        return self.ranked.num_truncated

    def hits(self) -> Iterator[Hit]:
        """The best ``top_n`` documents (every one when unset), best first, with raw scores."""
        for index in self.ranked.order[: self.top_n]:
            yield Hit(int(index), float(self.ranked.scores[index]))

    def scores(self, scale: Activation) -> np.ndarray:
        """Every document's reported score through ``scale``, in request order."""
        return scale(self.ranked.scores)

    def stage_scores(self, index: int, scale: Activation) -> dict[str, float | None]:
        """One document's score at each stage through ``scale``; None where it did not reach it."""
        raw = np.array([stage[index] for stage in self.ranked.stage_scores], dtype=np.float64)
        return {
            name: None if np.isnan(score) else float(score)
            for name, score in zip(self.stage_names, scale(raw), strict=True)
        }


@dataclass(frozen=True)
class ScoreAnswer:
    """A score call's raw logits in pair order, with the tokens they took."""

    scores: np.ndarray
    num_tokens: int


@dataclass
class RerankService:
    """A replica's serving core: its settings, the stages that score (one without a cascade), metrics."""

    settings: ServeSettings
    stages: Sequence[StageScorer]
    metrics: RerankMetrics | None
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        """Rank through the stages with the cascade's k (none for a single model)."""
        stages = self.settings.stages
        counts = [stage.rerank_count or 0 for stage in stages[:-1]]
        self.ranker = CascadeRanker(self.stages, counts, stage_names(stages))

    @property
    def engine(self) -> StageScorer:
        """The last (most precise) stage: what pair scoring uses; the only one without a cascade."""
        return self.stages[-1]

    @property
    def limits(self) -> RequestLimits:
        """The deployment's per-request limits."""
        serving = self.settings.serving
        return RequestLimits(serving.max_documents, serving.max_document_chars, serving.max_rerank_count)

    @property
    def model_name(self) -> str:
        """The name answers carry (``served_model_name``)."""
        return self.settings.served_model_name

    async def rerank(self, call: RerankCall) -> RerankAnswer:
        """Check, count and rank one request's documents through the stages.

        Raises:
            ModelNotFoundError: The call names a model not served here.
            RequestValidationError: The call breaks a limit, or sends an instruction no stage takes.
            PayloadTooLargeError: ``truncate`` is off and a document does not fit.
        """
        self._check_model(call.model)
        self._check_limits(call)
        self._count(call.route)
        ranked = await self.ranker.rank(
            call.query, call.documents, call.truncation, call.rerank_count, call.instruction
        )
        if not call.truncate and ranked.num_truncated:
            raise PayloadTooLargeError(
                f"{call.documents_field}: {ranked.num_truncated} inputs exceed {self.ranker.max_length} "
                f"tokens and {call.truncate_off}"
            )
        return RerankAnswer(ranked, call.top_n, self.ranker.names)

    async def score(self, call: ScoreCall) -> ScoreAnswer:
        """Check, count and score pairs on the last stage; raw logits in pair order.

        Raises:
            ModelNotFoundError: The call names a model not served here.
            RequestValidationError: The call breaks a limit, or sends an instruction the model takes none of.
        """
        self._check_model(call.model)
        limits = self.limits
        _checked(limits.check, "pairs", call.queries, "a query")
        _checked(limits.check, "pairs", call.passages, "a passage")
        _checked(limits.check, "instruction", [call.instruction or ""], "the instruction")
        self._count(call.route)
        if call.instruction is not None and not await self.engine.accepts_instruction():
            raise RequestValidationError("instruction: the served model takes none (not an LLM reranker)")
        scored = await self.engine.score(call.queries, call.passages, call.truncation, call.instruction)
        return ScoreAnswer(scored.scores, scored.num_tokens)

    def _check_model(self, requested: str | None) -> None:
        served = self.settings.served_model_name
        if requested and requested not in {served, self.settings.stages[-1].model}:
            raise ModelNotFoundError(f"model: {requested!r} is not served here; use {served!r}")

    def _check_limits(self, call: RerankCall) -> None:
        limits = self.limits
        _checked(limits.check, "query", [call.query], "query")
        _checked(limits.check, call.documents_field, call.documents, "a document")
        _checked(limits.check, "instruction", [call.instruction or ""], "the instruction")
        _checked(limits.check_rerank_count, call.rerank_count)

    def _count(self, route: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.inc(tags={"route": route})


def _checked(check: Callable[..., None], *args: object) -> None:
    """A limit check's ``ValueError`` as the 422 that names the field."""
    try:
        check(*args)
    except ValueError as exc:
        raise RequestValidationError(str(exc)) from None
