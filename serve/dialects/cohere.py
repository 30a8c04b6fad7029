"""Cohere (v1 and v2), Jina and vLLM rerank: ``POST /v1/rerank``, ``/v2/rerank`` and ``/rerank``.

One request shape covers their clients: documents as strings or objects (Cohere v1 / Jina), scored on
their ``rank_fields`` (Cohere v1; default ``text``); ``top_n`` (0 or null: every document, as vLLM);
``max_tokens_per_doc`` (Cohere v2), ``max_tokens_per_query`` (vLLM) and ``max_chunks_per_doc`` (Cohere
v1: a long document scores as its best window); ``return_documents`` echoes
each document as ``{"text": ...}``. Scores are the sigmoid of the model's logit (``relevance_score``),
best first.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from serve.core import RerankAnswer, RerankCall, RerankService, sigmoid
from serve.dialects import Dialect
from serve.engine import Truncation
from serve.schemas import (
    MAX_TOKENS,
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


class ObjectDocument(BaseModel):
    """A document given as an object (Cohere v1 / Jina): ``text``, or the fields ``rank_fields`` names."""

    model_config = ConfigDict(extra="allow")
    text: DocumentText | None = None

    def present(self, fields: list[str]) -> list[tuple[str, Any]]:
        """The named fields this document has (not null), in ``fields`` order, with their values."""
        values = self.model_dump(exclude_none=True)
        return [(name, values[name]) for name in fields if name in values]

    def ranked_text(self, fields: list[str]) -> str:
        """What is scored: the one named field's value, or ``field: value`` lines in ``fields`` order."""
        present = self.present(fields)
        if len(present) == 1:
            return str(present[0][1])
        return "\n".join(f"{name}: {value}" for name, value in present)


class RerankRequest(BaseModel):
    """A Cohere / Jina / vLLM rerank request."""

    model_config = ConfigDict(extra="ignore")
    query: NonBlankText
    rank_fields: list[str] | None = Field(
        None, min_length=1, description="Object documents: the fields scored, in this order (default: text)."
    )
    documents: Annotated[list[DocumentText | ObjectDocument], Field(min_length=1)]
    top_n: int | None = Field(None, ge=0, description="Best documents to return; 0 or null: all (vLLM).")
    return_documents: bool = False
    model: str | None = None
    max_tokens_per_doc: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Cut each document to this many tokens (Cohere v2)."
    )
    max_tokens_per_query: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Cut the query to this many tokens (vLLM)."
    )
    max_chunks_per_doc: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="A document too long for the model: score up to this many overlapping windows of it and "
        "report the best (Cohere v1); 1 cuts it to fit. Default: the deployment's max_chunks_per_doc.",
    )
    rerank_count: int | None = rerank_count_field()
    return_stage_scores: bool = stage_scores_field()
    instruction: NonBlankText | None = instruction_field()

    @field_validator("documents")
    @classmethod
    def _texts_not_blank(cls, documents: list[str | ObjectDocument], info: ValidationInfo) -> list[Any]:
        fields = info.data.get("rank_fields") or ["text"]
        for index, doc in enumerate(documents):
            if isinstance(doc, ObjectDocument) and not doc.present(fields):
                raise ValueError(f"document {index} has none of the fields {fields} (rank_fields)")
        check_not_blank(ranked_texts(documents, fields), "document")
        return documents

    def texts(self) -> list[str]:
        """What is scored of each document, in request order."""
        return ranked_texts(self.documents, self.rank_fields or ["text"])

    def limit(self) -> int | None:
        """How many results to return: ``top_n``; None (every one) for 0 or null."""
        return self.top_n or None


def ranked_texts(documents: list[str | ObjectDocument], fields: list[str]) -> list[str]:
    """What is scored of each document: a string as it is, an object's ``fields``."""
    return [doc if isinstance(doc, str) else doc.ranked_text(fields) for doc in documents]


class RerankDocument(BaseModel):
    """The document echoed back when ``return_documents`` is true."""

    text: str


class RerankResult(BaseModel):
    """One scored document: its index in the request and its relevance score."""

    index: int
    relevance_score: float
    document: RerankDocument | None = omitted()
    stage_scores: StageScores = None


class ApiVersion(BaseModel):
    """Cohere's API version marker."""

    version: str = "2"


class BilledUnits(BaseModel):
    """Cohere's billing unit: one search per request."""

    search_units: int = 1


class InputTokens(BaseModel):
    """Tokens fed to the model for this request."""

    input_tokens: int


class RerankMeta(BaseModel):
    """Cohere-style ``meta``: API version, billed units, tokens, and documents cut to fit."""

    api_version: ApiVersion = ApiVersion()
    billed_units: BilledUnits = BilledUnits()
    tokens: InputTokens
    truncated_documents: int


class RerankResponse(BaseModel):
    """A Cohere / Jina / vLLM rerank response, results sorted best first."""

    id: str
    model: str
    results: list[RerankResult]
    usage: Usage
    meta: RerankMeta


def rerank_call(body: RerankRequest, route: str = "rerank") -> RerankCall:
    """The request as the core's call."""
    return RerankCall(
        route=route,
        query=body.query,
        documents=body.texts(),
        top_n=body.limit(),
        model=body.model,
        truncation=Truncation(
            max_passage_tokens=body.max_tokens_per_doc,
            max_query_tokens=body.max_tokens_per_query,
            max_chunks=body.max_chunks_per_doc,
        ),
        rerank_count=body.rerank_count,
        instruction=body.instruction,
    )


def rerank_response(service: RerankService, body: RerankRequest, answer: RerankAnswer) -> RerankResponse:
    """The core's answer in this dialect: sigmoid relevance, best first, documents echoed if asked."""
    relevance = answer.scores(sigmoid)
    texts = body.texts()
    results = [
        RerankResult(
            index=hit.index,
            relevance_score=float(relevance[hit.index]),
            document=RerankDocument(text=texts[hit.index]) if body.return_documents else None,
            stage_scores=answer.stage_scores(hit.index, sigmoid) if body.return_stage_scores else None,
        )
        for hit in answer.hits()
    ]
    return RerankResponse(
        id=str(uuid.uuid4()),
        model=service.model_name,
        results=results,
        usage=Usage.of(answer.num_tokens),
        meta=RerankMeta(
            tokens=InputTokens(input_tokens=answer.num_tokens), truncated_documents=answer.num_truncated
        ),
    )


async def rerank(service: RerankService, body: RerankRequest) -> RerankResponse:
    """Rank the documents; the answer in Cohere / Jina / vLLM's shape."""
    return rerank_response(service, body, await service.rerank(rerank_call(body)))


DIALECT = Dialect(
    name="cohere",
    paths=("/v1/rerank", "/v2/rerank", "/rerank"),
    request=RerankRequest,
    response=RerankResponse,
    handle=rerank,
    summary="Cohere v1/v2, Jina, vLLM: sigmoid relevance_score, best first.",
)
