"""Schemas every API dialect shares: texts, limits, usage, models, health and the one error shape.

Each dialect's own request and response live in its module (``serve.dialects``). Fixed rules (types,
non-empty lists) are declared on the fields, so FastAPI validates them and documents them in OpenAPI;
a deployment's own limits (``RequestLimits``) are checked by the core (``serve.core``). Importing this
module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field


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


MAX_TOKENS = 1_000_000  # far past any model's max_length (what a text keeps at most)
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


def _absent(value: object) -> bool:
    return value is None


def omitted() -> Any:
    """An answer's optional field, left out (not null) when it is None: what clients of each API expect."""
    return Field(default=None, exclude_if=_absent)


StageScores = Annotated[
    dict[str, float | None] | None,
    Field(
        exclude_if=lambda value: value is None,
        description="With return_stage_scores: each stage's score (null where it did not reach the stage).",
    ),
]


def rerank_count_field() -> Any:
    """Our ``rerank_count`` field, the same on every rerank dialect."""
    return Field(
        None, ge=1, description="Cascades only: documents the last stage rescores (default: configured)."
    )


def stage_scores_field() -> Any:
    """Our ``return_stage_scores`` field, the same on every rerank dialect."""
    return Field(False, description="Add each stage's score to every result.")


def instruction_field() -> Any:
    """The ``instruction`` field (vLLM's name), the same on every dialect."""
    return Field(None, description=INSTRUCTION_DESCRIPTION)


class Usage(BaseModel):
    """Token accounting: the tokens fed to the model (every stage), as prompt and total tokens."""

    prompt_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, tokens: int) -> Usage:
        """Usage of ``tokens`` model input tokens (a reranker generates none)."""
        return cls(prompt_tokens=tokens, total_tokens=tokens)


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
    """The one error shape: ``{"error": {"type": ..., "message": ...}, "detail": message}``.

    ``detail`` repeats the message where FastAPI's own errors put it (Jina's clients read it).
    """

    error: ErrorBody
    detail: str

    @classmethod
    def of(cls, error_type: str, message: str) -> ErrorResponse:
        """The error answer of a kind and a message."""
        return cls(error=ErrorBody(type=error_type, message=message), detail=message)
