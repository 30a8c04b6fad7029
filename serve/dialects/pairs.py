"""Our pair scoring: ``POST /score`` with ``pairs``, scores in the pairs' order (raw logits by default)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.core import RerankService, ScoreCall, activation
from serve.dialects import Dialect
from serve.schemas import DocumentText, NonBlankText, Usage, check_not_blank, instruction_field


class ScoreRequest(BaseModel):
    """A batch of (query, passage) pairs to score in order."""

    model_config = ConfigDict(extra="ignore")
    pairs: Annotated[list[tuple[DocumentText, DocumentText]], Field(min_length=1)]
    raw_scores: bool = True
    model: str | None = None
    instruction: NonBlankText | None = instruction_field()

    @field_validator("pairs")
    @classmethod
    def _pairs_not_blank(cls, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        check_not_blank((query for query, _ in pairs), "the query of pair")
        check_not_blank((passage for _, passage in pairs), "the passage of pair")
        return pairs


class ScoreResponse(BaseModel):
    """Scores in the order of the request's pairs."""

    model: str
    scores: list[float]
    usage: Usage


async def score(service: RerankService, body: ScoreRequest) -> ScoreResponse:
    """Score the pairs; raw logits (or their sigmoid with ``raw_scores: false``) in input order."""
    call = ScoreCall(
        route="score",
        queries=[query for query, _ in body.pairs],
        passages=[passage for _, passage in body.pairs],
        model=body.model,
        instruction=body.instruction,
    )
    answer = await service.score(call)
    scores = activation(body.raw_scores)(answer.scores)
    return ScoreResponse(model=service.model_name, scores=scores.tolist(), usage=Usage.of(answer.num_tokens))


def sends_pairs(body: Mapping[str, Any]) -> bool:
    """Our body is the one with ``pairs``."""
    return "pairs" in body


DIALECT = Dialect(
    name="pairs",
    paths=("/score", "/v1/score"),
    request=ScoreRequest,
    response=ScoreResponse,
    handle=score,
    claims=sends_pairs,
    summary="Pairs (a body with pairs): scores in input order, raw logits unless raw_scores is false.",
)
