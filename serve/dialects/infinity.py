"""infinity's rerank: ``POST /infinity/rerank``, or ``/rerank`` with infinity's own ``raw_scores``.

Its clients send Cohere's fields (``query``, ``documents``, ``top_n``, ``return_documents``) and read
``results`` whose ``document`` is a plain string, where vLLM-style clients of ``/rerank`` read
``{"text": ...}``. The two cannot be told apart by what LiteLLM's infinity provider sends, so it has a path
of its own: point such a client at ``http://HOST:8000/infinity``. ``raw_scores`` (infinity's client
and LangChain's ``InfinityRerank`` send it) claims ``/rerank`` too; true gives logits.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel

from serve.core import RerankService, activation
from serve.dialects import Dialect
from serve.dialects.cohere import RerankRequest, rerank_call
from serve.schemas import StageScores, Usage, omitted


class InfinityRerankRequest(RerankRequest):
    """infinity's rerank request: Cohere's fields and ``raw_scores``."""

    raw_scores: bool = False


class InfinityResult(BaseModel):
    """One document: its index, its score, and itself (a string) when asked."""

    index: int
    relevance_score: float
    document: str | None = omitted()
    stage_scores: StageScores = None


class InfinityRerankResponse(BaseModel):
    """infinity's answer, best first."""

    object: Literal["rerank"] = "rerank"
    id: str
    created: int
    model: str
    results: list[InfinityResult]
    usage: Usage


async def rerank(service: RerankService, body: InfinityRerankRequest) -> InfinityRerankResponse:
    """Rank the documents; the answer in infinity's shape."""
    answer = await service.rerank(rerank_call(body, route="rerank_infinity"))
    scale = activation(body.raw_scores)
    scores, texts = answer.scores(scale), body.texts()
    results = [
        InfinityResult(
            index=hit.index,
            relevance_score=float(scores[hit.index]),
            document=texts[hit.index] if body.return_documents else None,
            stage_scores=answer.stage_scores(hit.index, scale) if body.return_stage_scores else None,
        )
        for hit in answer.hits()
    ]
    return InfinityRerankResponse(
        id=str(uuid.uuid4()),
        created=int(time.time()),
        model=service.model_name,
        results=results,
        usage=Usage.of(answer.num_tokens),
    )


def sends_raw_scores(body: Mapping[str, Any]) -> bool:
    """Infinity's own clients send ``raw_scores`` with ``documents``."""
    return "raw_scores" in body and "documents" in body


DIALECT = Dialect(
    name="infinity",
    paths=("/infinity/rerank", "/rerank"),
    request=InfinityRerankRequest,
    response=InfinityRerankResponse,
    handle=rerank,
    claims=sends_raw_scores,
    summary="infinity (its own path, or raw_scores with documents): results with documents as strings.",
)
