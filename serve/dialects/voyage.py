"""Voyage AI rerank: ``POST /v1/rerank`` or ``/rerank`` with ``top_k`` or a boolean ``truncation``.

Voyage's fields and defaults: ``top_k`` (null: every document), ``return_documents`` (each document
echoed as a plain string), ``truncation`` (true: cut what does not fit; false: refuse it, 413). The
answer is ``{"object": "list", "data": [{index, relevance_score, document}], "model", "usage"}``, best
first, with the sigmoid of the model's logit as ``relevance_score``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.core import RerankCall, RerankService, sigmoid
from serve.dialects import Dialect
from serve.schemas import (
    DocumentText,
    NonBlankText,
    StageScores,
    Usage,
    check_not_blank,
    instruction_field,
    omitted,
    rerank_count_field,
    stage_scores_field,
)


class VoyageRerankRequest(BaseModel):
    """A Voyage rerank request."""

    model_config = ConfigDict(extra="ignore")
    query: NonBlankText
    documents: Annotated[list[DocumentText], Field(min_length=1)]
    model: str | None = None
    top_k: int | None = Field(None, ge=1, description="Best documents to return; null: all.")
    return_documents: bool = False
    truncation: bool = True
    rerank_count: int | None = rerank_count_field()
    return_stage_scores: bool = stage_scores_field()
    instruction: NonBlankText | None = instruction_field()

    @field_validator("documents")
    @classmethod
    def _documents_not_blank(cls, documents: list[str]) -> list[str]:
        check_not_blank(documents, "document")
        return documents


class VoyageResult(BaseModel):
    """One document: its index in the request, its relevance, and itself when asked."""

    index: int
    relevance_score: float
    document: str | None = omitted()
    stage_scores: StageScores = None


class VoyageRerankResponse(BaseModel):
    """Voyage's answer, best first."""

    object: Literal["list"] = "list"
    data: list[VoyageResult]
    model: str
    usage: Usage


async def rerank(service: RerankService, body: VoyageRerankRequest) -> VoyageRerankResponse:
    """Rank the documents; the answer in Voyage's shape."""
    call = RerankCall(
        route="rerank_voyage",
        query=body.query,
        documents=body.documents,
        top_n=body.top_k,
        model=body.model,
        truncate=body.truncation,
        truncate_off="truncation is false",
        rerank_count=body.rerank_count,
        instruction=body.instruction,
    )
    answer = await service.rerank(call)
    relevance = answer.scores(sigmoid)
    results = [
        VoyageResult(
            index=hit.index,
            relevance_score=float(relevance[hit.index]),
            document=body.documents[hit.index] if body.return_documents else None,
            stage_scores=answer.stage_scores(hit.index, sigmoid) if body.return_stage_scores else None,
        )
        for hit in answer.hits()
    ]
    return VoyageRerankResponse(data=results, model=service.model_name, usage=Usage.of(answer.num_tokens))


def sends_voyage_fields(body: Mapping[str, Any]) -> bool:
    """Voyage's body: ``top_k`` or a boolean ``truncation``, and no ``top_n`` (Cohere's)."""
    return ("top_k" in body or isinstance(body.get("truncation"), bool)) and "top_n" not in body


DIALECT = Dialect(
    name="voyage",
    paths=("/v1/rerank", "/rerank"),
    request=VoyageRerankRequest,
    response=VoyageRerankResponse,
    handle=rerank,
    claims=sends_voyage_fields,
    summary="Voyage (a body with top_k or a boolean truncation): data of {index, relevance_score}.",
)
