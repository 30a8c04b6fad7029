"""Request and response schemas of the rerank APIs (Cohere / Jina / vLLM, TEI, pair scoring).

Shapes and fixed rules (types, non-empty lists, ``top_n >= 1``) are declared on the fields, so FastAPI
validates them and documents them in OpenAPI. A deployment's own limits (documents per request,
characters per text) are declared here too, as ``check_limits``, which the routes' dependencies
call with the replica's ``RequestLimits``. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from reranker.types import TruncationSide


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits of one deployment."""

    max_documents: int
    max_document_chars: int
    max_rerank_count: int = 100

    def check_rerank_count(self, rerank_count: int | None) -> None:
        """Raise ``ValueError`` if a request asks a cascade to pass on more than the deployment allows."""
        if rerank_count is not None and rerank_count > self.max_rerank_count:
            raise ValueError(f"rerank_count: {rerank_count} is over the limit of {self.max_rerank_count}")

    def check(self, field: str, texts: Iterable[str], what: str) -> None:
        """Raise ``ValueError`` naming ``field`` if there are too many texts or one is too long."""
        count = 0
        for text in texts:
            count += 1
            if len(text) > self.max_document_chars:
                raise ValueError(
                    f"{field}: {what} has {len(text)} characters; the limit is {self.max_document_chars}"
                )
        if count > self.max_documents:
            raise ValueError(f"{field}: has {count} items; the limit is {self.max_documents}")


MAX_TOKENS_PER_DOC = 1_000_000  # far past any model's max_length (what a document keeps at most)
INSTRUCTION_DESCRIPTION = (
    "LLM rerankers: the task description in the model's prompt (vLLM's `instruction`); default: the "
    "model's. A request for a model that takes none is a 422."
)
BLANK_HINT = "nothing to score (the offline job gives such a pair a null score)"


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError(f"is blank (empty or whitespace only): {BLANK_HINT}")
    return text


def check_not_blank(texts: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` naming the index of the first blank text.

    The service refuses blank texts (422) where the job gives them a null score: one documented
    answer per route, never a score for nothing.
    """
    for index, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"{what} {index} is blank (empty or whitespace only): {BLANK_HINT}")


_NOT_BLANK_PATTERN = {"pattern": r"\S"}  # documented for clients and fuzzers; the validators enforce it
NonBlankText = Annotated[
    str, Field(min_length=1, json_schema_extra=_NOT_BLANK_PATTERN), AfterValidator(_not_blank)
]
DocumentText = Annotated[str, Field(json_schema_extra=_NOT_BLANK_PATTERN)]


class TextDocument(BaseModel):
    """A document given as an object (Cohere v2 / Jina style)."""

    model_config = ConfigDict(extra="allow")
    text: DocumentText


class RerankRequest(BaseModel):
    """Cohere / Jina / vLLM ``/v1/rerank`` request."""

    model_config = ConfigDict(extra="ignore")
    query: NonBlankText
    documents: Annotated[list[DocumentText | TextDocument], Field(min_length=1)]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    model: str | None = None
    max_tokens_per_doc: int | None = Field(
        None, ge=1, le=MAX_TOKENS_PER_DOC, description="Cut each document to this many tokens."
    )
    rerank_count: int | None = Field(
        None, ge=1, description="Cascades only: documents the last stage rescores (default: configured)."
    )
    return_stage_scores: bool = Field(False, description="Add each stage's score to every result.")
    instruction: NonBlankText | None = Field(None, description=INSTRUCTION_DESCRIPTION)

    @field_validator("documents")
    @classmethod
    def _documents_not_blank(cls, documents: list[str | TextDocument]) -> list[str | TextDocument]:
        check_not_blank((doc if isinstance(doc, str) else doc.text for doc in documents), "document")
        return documents

    def texts(self) -> list[str]:
        """Document texts in request order."""
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]

    def check_limits(self, limits: RequestLimits) -> None:
        """Raise ``ValueError`` naming the field that breaks the deployment's limits."""
        limits.check("query", [self.query], "query")
        limits.check("documents", self.texts(), "a document")
        limits.check("instruction", [self.instruction or ""], "the instruction")
        limits.check_rerank_count(self.rerank_count)


class TEIRerankRequest(BaseModel):
    """Hugging Face Text Embeddings Inference ``/rerank`` request."""

    model_config = ConfigDict(extra="ignore")
    query: NonBlankText
    texts: Annotated[list[DocumentText], Field(min_length=1)]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = True
    truncation_direction: TruncationSide = "right"
    rerank_count: int | None = Field(
        None, ge=1, description="Cascades only: documents the last stage rescores (default: configured)."
    )
    return_stage_scores: bool = Field(False, description="Add each stage's score to every result.")
    instruction: NonBlankText | None = Field(None, description=INSTRUCTION_DESCRIPTION)

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

    def check_limits(self, limits: RequestLimits) -> None:
        """Raise ``ValueError`` naming the field that breaks the deployment's limits."""
        limits.check("query", [self.query], "query")
        limits.check("texts", self.texts, "a text")
        limits.check("instruction", [self.instruction or ""], "the instruction")
        limits.check_rerank_count(self.rerank_count)


def _rerank_kind(body: Any) -> str:
    has_texts = "texts" in body if isinstance(body, dict) else isinstance(body, TEIRerankRequest)
    return "tei" if has_texts else "cohere"


AnyRerankRequest = Annotated[
    Annotated[RerankRequest, Tag("cohere")] | Annotated[TEIRerankRequest, Tag("tei")],
    Discriminator(_rerank_kind),
]
"""``/rerank`` takes either shape: ``texts`` means TEI, else Cohere / Jina / vLLM."""
UNION_TAGS = ("cohere", "tei")


class ScoreRequest(BaseModel):
    """A batch of (query, passage) pairs to score in order."""

    model_config = ConfigDict(extra="ignore")
    pairs: Annotated[list[tuple[DocumentText, DocumentText]], Field(min_length=1)]
    raw_scores: bool = True
    model: str | None = None
    instruction: NonBlankText | None = Field(None, description=INSTRUCTION_DESCRIPTION)

    @field_validator("pairs")
    @classmethod
    def _pairs_not_blank(cls, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        check_not_blank((query for query, _ in pairs), "the query of pair")
        check_not_blank((passage for _, passage in pairs), "the passage of pair")
        return pairs

    def check_limits(self, limits: RequestLimits) -> None:
        """Raise ``ValueError`` naming the field that breaks the deployment's limits."""
        limits.check("pairs", (query for query, _ in self.pairs), "a query")
        limits.check("pairs", (passage for _, passage in self.pairs), "a passage")
        limits.check("instruction", [self.instruction or ""], "the instruction")


class RerankDocument(BaseModel):
    """The document echoed back when ``return_documents`` is true."""

    text: str


StageScores = Annotated[
    dict[str, float | None] | None,
    Field(
        exclude_if=lambda value: value is None,
        description="With return_stage_scores: each stage's score (null where it did not reach the stage).",
    ),
]


class RerankResult(BaseModel):
    """One scored document: its index in the request and its relevance score."""

    index: int
    relevance_score: float
    document: RerankDocument | None = None
    stage_scores: StageScores = None


class Usage(BaseModel):
    """Token accounting."""

    total_tokens: int


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
    """Cohere / Jina / vLLM rerank response, results sorted best first."""

    id: str
    model: str
    results: list[RerankResult]
    usage: Usage
    meta: RerankMeta


class TEIRank(BaseModel):
    """One TEI result."""

    index: int
    score: float
    text: str | None = None
    stage_scores: StageScores = None


class ScoreResponse(BaseModel):
    """Scores in the order of the request's pairs."""

    model: str
    scores: list[float]
    usage: Usage


class StageCard(BaseModel):
    """One scoring stage of the served model: its name, model and kind."""

    name: str
    model: str
    kind: str = Field(description="sequence-classification, llm-yes-no or sentence-transformers.")
    takes_instruction: bool


class ModelCard(BaseModel):
    """One entry of the OpenAI-style model list, with what kind of reranker it is."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ray-rerank"
    kind: str = Field(description="The (last) stage's kind: sequence-classification, llm-yes-no, ...")
    takes_instruction: bool = Field(description="Whether requests may send an instruction.")
    stages: list[StageCard] = Field(
        description="Every scoring stage, cheapest first (one without a cascade)."
    )


class ModelList(BaseModel):
    """OpenAI-style ``/v1/models`` answer."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """``/health`` answer; ``config_refused`` names each stage whose last ``user_config`` was refused."""

    status: Literal["ok"] = "ok"
    config_refused: Annotated[
        dict[str, str] | None,
        Field(
            exclude_if=lambda value: not value,
            description="Stages that refused their last user_config (and kept their settings), and why.",
        ),
    ] = None


class ErrorBody(BaseModel):
    """The inside of every error response."""

    type: str
    message: str


class ErrorResponse(BaseModel):
    """The one error shape: ``{"error": {"type": ..., "message": ...}}``."""

    error: ErrorBody
