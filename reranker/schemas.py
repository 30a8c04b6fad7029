"""Request and response schemas of the rerank APIs (Cohere / Jina / vLLM, TEI, pair scoring).

Limits are declared here and read from the validation context (``{"limits": RequestLimits}``), so a
deployment can change them without code changes; without a context the defaults apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from reranker.model import TruncationSide


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits enforced by the schemas."""

    max_documents: int = 1000
    max_document_chars: int = 20_000


def _limits(info: ValidationInfo) -> RequestLimits:
    context = info.context or {}
    limits = context.get("limits")
    return limits if isinstance(limits, RequestLimits) else RequestLimits()


def _check_text(value: str, info: ValidationInfo, what: str) -> str:
    limit = _limits(info).max_document_chars
    if len(value) > limit:
        raise ValueError(f"{what} has {len(value)} characters; the limit is {limit}")
    return value


def _check_count(items: list[Any], info: ValidationInfo, what: str) -> list[Any]:
    if not items:
        raise ValueError(f"{what} must not be empty")
    limit = _limits(info).max_documents
    if len(items) > limit:
        raise ValueError(f"{what} has {len(items)} items; the limit is {limit}")
    return items


class TextDocument(BaseModel):
    """A document given as an object (Cohere v2 / Jina style)."""

    model_config = ConfigDict(extra="allow")
    text: str


NonEmptyQuery = Annotated[str, Field(min_length=1)]


class QueryRequest(BaseModel):
    """Fields shared by the rerank requests: one non-empty query within the size limit."""

    model_config = ConfigDict(extra="ignore")
    query: NonEmptyQuery

    @field_validator("query")
    @classmethod
    def _query_size(cls, value: str, info: ValidationInfo) -> str:
        return _check_text(value, info, "query")


class RerankRequest(QueryRequest):
    """Cohere / Jina / vLLM ``/v1/rerank`` request."""

    documents: list[str | TextDocument]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    model: str | None = None
    max_tokens_per_doc: int | None = Field(None, ge=1)

    @field_validator("documents")
    @classmethod
    def _documents_size(
        cls, value: list[str | TextDocument], info: ValidationInfo
    ) -> list[str | TextDocument]:
        for document in value:
            _check_text(document if isinstance(document, str) else document.text, info, "a document")
        return _check_count(value, info, "documents")

    def texts(self) -> list[str]:
        """Document texts in request order."""
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]


class RerankDocument(BaseModel):
    """The document echoed back when ``return_documents`` is true."""

    text: str


class RerankResult(BaseModel):
    """One scored document: its index in the request and its relevance score."""

    index: int
    relevance_score: float
    document: RerankDocument | None = None


class Usage(BaseModel):
    """Token accounting."""

    total_tokens: int


class RerankResponse(BaseModel):
    """Cohere / Jina / vLLM rerank response, results sorted best first."""

    id: str
    model: str
    results: list[RerankResult]
    usage: Usage
    meta: dict[str, Any]


class TEIRerankRequest(QueryRequest):
    """Hugging Face Text Embeddings Inference ``/rerank`` request."""

    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = True
    truncation_direction: TruncationSide = "right"

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _lowercase_direction(cls, value: object) -> object:
        """TEI clients send "Right" / "Left"."""
        return value.lower() if isinstance(value, str) else value

    @field_validator("texts")
    @classmethod
    def _texts_size(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for text in value:
            _check_text(text, info, "a text")
        return _check_count(value, info, "texts")


class TEIRank(BaseModel):
    """One TEI result."""

    index: int
    score: float
    text: str | None = None


class ScoreRequest(BaseModel):
    """A batch of (query, passage) pairs to score in order."""

    model_config = ConfigDict(extra="ignore")
    pairs: list[tuple[str, str]]
    raw_scores: bool = True
    model: str | None = None

    @field_validator("pairs")
    @classmethod
    def _pairs_size(cls, value: list[tuple[str, str]], info: ValidationInfo) -> list[tuple[str, str]]:
        for query, passage in value:
            _check_text(query, info, "a query")
            _check_text(passage, info, "a passage")
        return _check_count(value, info, "pairs")


class ScoreResponse(BaseModel):
    """Scores in the order of the request's pairs."""

    model: str
    scores: list[float]
    usage: Usage


class ErrorBody(BaseModel):
    """The inside of every error response."""

    type: str
    message: str


class ErrorResponse(BaseModel):
    """The one error shape: ``{"error": {"type": ..., "message": ...}}``."""

    error: ErrorBody
