"""NVIDIA NIM text reranking: ``POST /v1/ranking`` (and ``/v1/retrieval/{model}/reranking``, LiteLLM's).

``query: {text}``, ``passages: [{text}]``, ``truncate``: ``"END"`` cuts what does not fit at its end,
``"NONE"`` (NIM's default) refuses it (413); ``top_k`` (LiteLLM sends it) keeps the best k. The answer is
``rankings`` of ``{index, logit}``, the raw logit, best first (every passage without ``top_k``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.core import RerankCall, RerankService
from serve.dialects import Dialect
from serve.schemas import DocumentText, NonBlankText, Usage, check_not_blank, instruction_field


class NIMText(BaseModel):
    """A query or passage: ``{"text": ...}``."""

    model_config = ConfigDict(extra="ignore")
    text: DocumentText


class NIMQuery(BaseModel):
    """The query: ``{"text": ...}``."""

    model_config = ConfigDict(extra="ignore")
    text: NonBlankText


class NIMRankingRequest(BaseModel):
    """A NIM ranking request."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    query: NIMQuery
    passages: Annotated[list[NIMText], Field(min_length=1)]
    truncate: Literal["NONE", "END"] = "NONE"
    top_k: int | None = Field(None, ge=1, description="Best passages to return (default: all).")
    instruction: NonBlankText | None = instruction_field()

    @field_validator("passages")
    @classmethod
    def _passages_not_blank(cls, passages: list[NIMText]) -> list[NIMText]:
        check_not_blank((passage.text for passage in passages), "passage")
        return passages


class NIMRanking(BaseModel):
    """One passage: its index in the request and its raw logit."""

    index: int
    logit: float


class NIMRankingResponse(BaseModel):
    """NIM's answer: every passage, best first."""

    rankings: list[NIMRanking]
    usage: Usage


async def rank(service: RerankService, body: NIMRankingRequest) -> NIMRankingResponse:
    """Rank every passage; raw logits, best first."""
    call = RerankCall(
        route="ranking_nim",
        query=body.query.text,
        documents=[passage.text for passage in body.passages],
        top_n=body.top_k,
        model=body.model,
        truncate=body.truncate == "END",
        truncate_off='truncate is "NONE"',
        instruction=body.instruction,
        documents_field="passages",
    )
    answer = await service.rerank(call)
    return NIMRankingResponse(
        rankings=[NIMRanking(index=hit.index, logit=hit.score) for hit in answer.hits()],
        usage=Usage.of(answer.num_tokens),
    )


DIALECT = Dialect(
    name="nim",
    paths=("/v1/ranking", "/v1/retrieval/{model_path}/reranking"),
    request=NIMRankingRequest,
    response=NIMRankingResponse,
    handle=rank,
    summary="NVIDIA NIM: rankings of {index, logit}, best first; truncate NONE refuses what does not fit.",
)
