"""vLLM's score API: ``POST /score`` and ``/v1/score`` with two lists of texts.

Every shape vLLM takes: ``queries`` / ``documents``, ``queries`` / ``items``, ``data_1`` / ``data_2`` and
``text_1`` / ``text_2``; each side a text or a list. One query against many documents, or N against N
(paired in order). The answer is vLLM's: ``data`` of ``{index, object: "score", score}`` in pair order,
scores through the sigmoid (the model's activation) unless ``use_activation`` is false.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.core import RerankService, ScoreCall, activation
from serve.dialects import Dialect
from serve.schemas import DocumentText, NonBlankText, Usage, check_not_blank, instruction_field

Texts = DocumentText | Annotated[list[DocumentText], Field(min_length=1)]
SIDES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class VLLMScoreRequest(BaseModel):
    """A vLLM score request: a first side (the queries) and a second (the documents), by any of its names."""

    model_config = ConfigDict(extra="ignore")
    queries: Texts | None = None
    documents: Texts | None = None
    items: Texts | None = None
    data_1: Texts | None = None
    data_2: Texts | None = None
    text_1: Texts | None = None
    text_2: Texts | None = None
    model: str | None = None
    use_activation: bool | None = Field(None, description="false: raw logits (default: the sigmoid).")
    instruction: NonBlankText | None = instruction_field()

    @model_validator(mode="after")
    def _one_pair_of_sides(self) -> VLLMScoreRequest:
        sent = [(first, second) for first, second in SIDES if self._side(first) and self._side(second)]
        if not sent:
            raise ValueError(
                "send the texts as queries/documents, queries/items, data_1/data_2 or text_1/text_2"
            )
        first, second = self.sides()
        if len(first) != 1 and len(first) != len(second):
            raise ValueError(f"{sent[0][0]}: {len(first)} texts for {len(second)}; send one, or one per text")
        check_not_blank(first, "query")
        check_not_blank(second, "document")
        return self

    def _side(self, name: str) -> list[str] | None:
        value = getattr(self, name)
        return [value] if isinstance(value, str) else value

    def sides(self) -> tuple[list[str], list[str]]:
        """The first side's texts and the second's, from the first pair of names sent."""
        for first, second in SIDES:
            queries, documents = self._side(first), self._side(second)
            if queries and documents:
                return queries, documents
        raise ValueError("no texts")

    def pairs(self) -> tuple[list[str], list[str]]:
        """The (query, document) pairs: one query against every document, or paired in order."""
        queries, documents = self.sides()
        return (queries * len(documents) if len(queries) == 1 else queries), documents


class ScoreData(BaseModel):
    """One pair's score."""

    index: int
    object: Literal["score"] = "score"
    score: float


class VLLMScoreResponse(BaseModel):
    """vLLM's score response: scores in pair order."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


async def score(service: RerankService, body: VLLMScoreRequest) -> VLLMScoreResponse:
    """Score the pairs; the sigmoid of each logit (raw with ``use_activation: false``) in pair order."""
    queries, documents = body.pairs()
    call = ScoreCall(
        route="score_vllm",
        queries=queries,
        passages=documents,
        model=body.model,
        instruction=body.instruction,
    )
    answer = await service.score(call)
    scores = activation(body.use_activation is False)(answer.scores)
    return VLLMScoreResponse(
        id=f"score-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=service.model_name,
        data=[ScoreData(index=index, score=float(value)) for index, value in enumerate(scores)],
        usage=Usage.of(answer.num_tokens),
    )


DIALECT = Dialect(
    name="vllm_score",
    paths=("/score", "/v1/score"),
    request=VLLMScoreRequest,
    response=VLLMScoreResponse,
    handle=score,
    summary="vLLM score (queries/documents, data_1/data_2, text_1/text_2): data in pair order, sigmoid.",
)
