"""Hugging Face Text Embeddings Inference rerank: ``POST /rerank`` with ``texts``.

TEI's fields and defaults: ``raw_scores`` (logits instead of sigmoid), ``return_text``, ``truncate``
(false: an input over the model's length is a 413), ``truncation_direction`` ("Right" / "Left", either
case). The answer is a bare array, sorted best first, of every text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from reranker.types import TruncationSide
from serve.core import RerankCall, RerankService, activation
from serve.dialects import Dialect
from serve.engine import Truncation
from serve.schemas import (
    DocumentText,
    NonBlankText,
    StageScores,
    check_not_blank,
    instruction_field,
    omitted,
    rerank_count_field,
    stage_scores_field,
)


class TEIRerankRequest(BaseModel):
    """A TEI ``/rerank`` request."""

    model_config = ConfigDict(extra="ignore")
    query: NonBlankText
    texts: Annotated[list[DocumentText], Field(min_length=1)]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = True
    truncation_direction: TruncationSide = "right"
    top_n: int | None = Field(None, ge=0, description="Best texts to return (not TEI's; 0 or null: all).")
    rerank_count: int | None = rerank_count_field()
    return_stage_scores: bool = stage_scores_field()
    instruction: NonBlankText | None = instruction_field()

    @field_validator("texts")
    @classmethod
    def _texts_not_blank(cls, texts: list[str]) -> list[str]:
        check_not_blank(texts, "text")
        return texts

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _lowercase_direction(cls, value: object) -> object:
        """TEI clients send "Right" / "Left"."""
        return value.lower() if isinstance(value, str) else value


class TEIRank(BaseModel):
    """One TEI result."""

    index: int
    score: float
    text: str | None = omitted()
    stage_scores: StageScores = None


async def rerank(service: RerankService, body: TEIRerankRequest) -> list[TEIRank]:
    """Every text scored and sorted, truncated from ``truncation_direction``."""
    call = RerankCall(
        route="rerank_tei",
        query=body.query,
        documents=body.texts,
        top_n=body.top_n or None,
        truncation=Truncation(side=body.truncation_direction),
        truncate=body.truncate,
        rerank_count=body.rerank_count,
        instruction=body.instruction,
        documents_field="texts",
    )
    answer = await service.rerank(call)
    scale = activation(body.raw_scores)
    scores = answer.scores(scale)
    return [
        TEIRank(
            index=hit.index,
            score=float(scores[hit.index]),
            text=body.texts[hit.index] if body.return_text else None,
            stage_scores=answer.stage_scores(hit.index, scale) if body.return_stage_scores else None,
        )
        for hit in answer.hits()
    ]


def sends_texts(body: Mapping[str, Any]) -> bool:
    """TEI's body is the one with ``texts``."""
    return "texts" in body


DIALECT = Dialect(
    name="tei",
    paths=("/rerank",),
    request=TEIRerankRequest,
    response=list[TEIRank],
    handle=rerank,
    claims=sends_texts,
    summary="TEI (a body with texts): a bare array of {index, score}, best first.",
)
