"""HTTP edge: FastAPI routes for the rerank APIs. Domain errors become HTTP errors only here.

Routes read the per-replica ``RerankService`` from ``app.state.service``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from reranker.errors import (
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RerankError,
    ValidationError,
)
from reranker.model import TruncationSide, sigmoid
from reranker.schemas import (
    ErrorResponse,
    RequestLimits,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreRequest,
    ScoreResponse,
    TEIRank,
    TEIRerankRequest,
    Usage,
)
from reranker.settings import ServeSettings
from serve.engine import RerankEngine, Scored
from serve.metrics import RerankMetrics

STATUS_BY_ERROR: dict[type[RerankError], int] = {
    InvalidRequestError: 400,
    AuthenticationError: 401,
    ModelNotFoundError: 404,
    PayloadTooLargeError: 413,
    ValidationError: 422,
    OverloadedError: 503,
}
OPEN_PATHS = {"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
Schema = TypeVar("Schema", bound=pydantic.BaseModel)


@dataclass
class RerankService:
    """What the routes need from the replica: settings, engine, metrics."""

    settings: ServeSettings
    engine: RerankEngine
    metrics: RerankMetrics | None
    started: int

    @property
    def model_names(self) -> set[str]:
        """Names a request's ``model`` field may use."""
        return {self.settings.served_model_name or self.settings.model, self.settings.model}

    @property
    def model_name(self) -> str:
        """The name reported in responses."""
        return self.settings.served_model_name or self.settings.model


def error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error shape: ``{"error": {"type", "message"}}``."""
    body = ErrorResponse.model_validate({"error": {"type": error_type, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def find_service(request: Request) -> RerankService | None:
    """The replica's service: on ``app.state`` (plain FastAPI) or the Serve replica's instance."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        try:
            service = getattr(serve.get_replica_context().servable_object, "service", None)
        except RayServeException:
            return None
    return service


def _service(request: Request) -> RerankService:
    service = find_service(request)
    if service is None:
        raise OverloadedError("model is not loaded yet")
    return service


def _count_error(request: Request, error_type: str) -> None:
    service = find_service(request)
    if service is not None and service.metrics is not None:
        service.metrics.errors.inc(tags={"type": error_type})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RerankError)
    async def on_domain_error(request: Request, exc: RerankError) -> JSONResponse:
        _count_error(request, exc.error_type)
        status = STATUS_BY_ERROR.get(type(exc), 400)
        headers = None
        if isinstance(exc, OverloadedError):
            headers = {"Retry-After": str(_service(request).settings.retry_after_s)}
        return error_response(status, exc.error_type, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def on_request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count_error(request, ValidationError.error_type)
        return error_response(422, ValidationError.error_type, describe_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        _count_error(request, "http_error")
        return error_response(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        _count_error(request, "internal_error")
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


def describe_errors(errors: Any) -> str:
    """Pydantic errors as ``field: message; ...`` (the field path is always named)."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


async def parse_body(request: Request, schema: type[Schema], body: dict[str, Any] | None = None) -> Schema:
    """Validate a JSON body against ``schema`` with the replica's limits in the context."""
    payload = body if body is not None else await read_json(request)
    settings = _service(request).settings
    limits = RequestLimits(settings.max_documents, settings.max_document_chars)
    try:
        return schema.model_validate(payload, context={"limits": limits})
    except pydantic.ValidationError as exc:
        raise ValidationError(describe_errors(exc.errors())) from None


async def read_json(request: Request) -> dict[str, Any]:
    """Read the body as a JSON object, enforcing the body size limit."""
    limit = _service(request).settings.max_body_bytes
    if int(request.headers.get("content-length") or 0) > limit:
        raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
    raw = await request.body()
    if len(raw) > limit:
        raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError("body must be a JSON object")
    return payload


def check_model(service: RerankService, requested: str | None) -> None:
    """Reject a request that names a model this server does not serve."""
    if requested and requested not in service.model_names:
        raise ModelNotFoundError(f"model: {requested!r} is not served here; use {service.model_name!r}")


def _openapi_body(schema: type[pydantic.BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema.model_json_schema()}},
        }
    }


def create_api() -> FastAPI:
    """The FastAPI app; a replica attaches its ``RerankService`` to ``app.state.service``."""
    app = FastAPI(title="ray-rerank", version="0.1.0", description="Cross-encoder reranking on Ray Serve.")
    _install_error_handlers(app)

    @app.middleware("http")
    async def require_api_key(request: Request, call_next: Any) -> Any:
        service = find_service(request)
        key = service.settings.api_key if service is not None else None
        expected = f"Bearer {key.get_secret_value()}" if key is not None else None
        path = request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"
        if expected and path not in OPEN_PATHS and request.headers.get("authorization") != expected:
            _count_error(request, AuthenticationError.error_type)
            return error_response(401, AuthenticationError.error_type, "missing or invalid API key")
        return await call_next(request)

    _add_rerank_routes(app)
    _add_info_routes(app)
    return app


def _add_rerank_routes(app: FastAPI) -> None:
    @app.post("/v1/rerank", response_model=RerankResponse, openapi_extra=_openapi_body(RerankRequest))
    @app.post("/v2/rerank", response_model=RerankResponse, openapi_extra=_openapi_body(RerankRequest))
    async def rerank_documents(request: Request) -> RerankResponse:
        """Cohere / Jina / vLLM rerank."""
        return await _rerank_documents(request, await parse_body(request, RerankRequest))

    @app.post(
        "/rerank",
        response_model=RerankResponse | list[TEIRank],
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [RerankRequest.model_json_schema(), TEIRerankRequest.model_json_schema()]
                        }
                    }
                }
            }
        },
    )
    async def rerank_any(request: Request) -> RerankResponse | list[TEIRank]:
        """``texts`` in the body: TEI rerank; ``documents``: Cohere / Jina / vLLM rerank."""
        body = await read_json(request)
        if "texts" in body:
            return await _rerank_tei(request, await parse_body(request, TEIRerankRequest, body))
        return await _rerank_documents(request, await parse_body(request, RerankRequest, body))

    @app.post("/score", response_model=ScoreResponse, openapi_extra=_openapi_body(ScoreRequest))
    async def score_pairs(request: Request) -> ScoreResponse:
        """Score (query, passage) pairs; scores in input order (raw logits unless raw_scores=false)."""
        service = _service(request)
        payload = await parse_body(request, ScoreRequest)
        check_model(service, payload.model)
        _count_request(service, "score")
        scored = await service.engine.score([q for q, _ in payload.pairs], [p for _, p in payload.pairs])
        scores = scored.scores if payload.raw_scores else sigmoid(scored.scores)
        return ScoreResponse(
            model=service.model_name, scores=scores.tolist(), usage=Usage(total_tokens=scored.num_tokens)
        )


def _count_request(service: RerankService, route: str) -> None:
    if service.metrics is not None:
        service.metrics.requests.inc(tags={"route": route})


async def _score_documents(
    service: RerankService,
    query: str,
    documents: list[str],
    max_length: int | None = None,
    side: TruncationSide = "right",
) -> Scored:
    return await service.engine.score([query] * len(documents), documents, max_length, side)


async def _rerank_documents(request: Request, payload: RerankRequest) -> RerankResponse:
    service = _service(request)
    check_model(service, payload.model)
    _count_request(service, "rerank")
    documents = payload.texts()
    max_length = None
    if payload.max_tokens_per_doc is not None:
        query_tokens = len(service.engine.model.tokenizer(payload.query)["input_ids"])
        max_length = query_tokens + payload.max_tokens_per_doc + 1
    scored = await _score_documents(service, payload.query, documents, max_length)
    relevance = sigmoid(scored.scores)
    order = np.argsort(-relevance, kind="stable")[: payload.top_n]
    results = [
        RerankResult(
            index=int(i),
            relevance_score=float(relevance[i]),
            document=RerankDocument(text=documents[i]) if payload.return_documents else None,
        )
        for i in order
    ]
    return RerankResponse(
        id=str(uuid.uuid4()),
        model=service.model_name,
        results=results,
        usage=Usage(total_tokens=scored.num_tokens),
        meta={
            "api_version": {"version": "2"},
            "billed_units": {"search_units": 1},
            "tokens": {"input_tokens": scored.num_tokens},
            "truncated_documents": scored.num_truncated,
            "batch": {"requests": scored.batch_requests, "pairs": scored.batch_pairs},
        },
    )


async def _rerank_tei(request: Request, payload: TEIRerankRequest) -> list[TEIRank]:
    service = _service(request)
    _count_request(service, "rerank_tei")
    scored = await _score_documents(service, payload.query, payload.texts, side=payload.truncation_direction)
    if not payload.truncate and scored.num_truncated:
        raise PayloadTooLargeError(
            f"texts: {scored.num_truncated} inputs exceed {service.engine.model.max_length} tokens "
            "and truncate is false"
        )
    scores = scored.scores if payload.raw_scores else sigmoid(scored.scores)
    order = np.argsort(-scores, kind="stable")
    return [
        TEIRank(index=int(i), score=float(scores[i]), text=payload.texts[i] if payload.return_text else None)
        for i in order
    ]


def _add_info_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> dict[str, str]:
        """200 when the model scores a probe pair, else 503."""
        service = _service(request)
        try:
            await service.engine.health_check()
        except Exception as exc:
            raise OverloadedError(f"model cannot score: {exc}") from exc
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        """OpenAI-style model list."""
        service = _service(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": service.model_name,
                    "object": "model",
                    "created": service.started,
                    "owned_by": "ray-rerank",
                }
            ],
        }


def make_service(
    settings: ServeSettings, engine: RerankEngine, metrics: RerankMetrics | None
) -> RerankService:
    """Bundle what the routes need; a Serve replica keeps it as its ``service`` attribute."""
    return RerankService(settings, engine, metrics, int(time.time()))
