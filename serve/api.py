"""HTTP edge: FastAPI routes for the rerank APIs. Errors become HTTP answers only here.

Typed bodies (validated and documented by FastAPI), and dependencies for what every route needs:
the replica's ``RerankService``, the API-key check, and the deployment's request limits.

No ``from __future__ import annotations`` here: Serve pickles the app to its replicas, and FastAPI
needs the annotations as objects there, not as strings to resolve against the module's globals.
"""

import logging
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reranker.cascade import stage_names
from reranker.errors import RerankError
from reranker.scores import sigmoid
from serve.cascade import CascadeRanker, Ranked, StageScorer
from serve.engine import Truncation
from serve.errors import (
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ReplicaLostError,
    RequestValidationError,
    status_of,
)
from serve.metrics import RerankMetrics
from serve.schemas import (
    UNION_TAGS,
    AnyRerankRequest,
    ErrorResponse,
    Health,
    InputTokens,
    ModelCard,
    ModelList,
    RequestLimits,
    RerankDocument,
    RerankMeta,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreRequest,
    ScoreResponse,
    StageCard,
    TEIRank,
    TEIRerankRequest,
    Usage,
)
from serve.settings import ServeSettings

Body = TypeVar("Body", bound=RerankRequest | TEIRerankRequest | ScoreRequest)
logger = logging.getLogger("ray.serve")
REQUEST_ID_HEADER = "X-Request-Id"
_DESCRIPTIONS = {
    400: "The body is not valid JSON, or not a JSON object.",
    401: "An API key is configured and the request lacks it (Authorization: Bearer KEY).",
    404: "The request names a model this server does not serve.",
    413: "The body exceeds max_body_bytes, or an input is too long and truncate is false.",
    422: "A field breaks the schema or a limit (the message names it), or a text is blank.",
    500: "An internal error; the message holds a request id to find the details in the server log.",
    503: "Overloaded (queue full), the model is not ready, or a cascade stage's replica was lost; "
    "retry after Retry-After seconds.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route can return, all with the one error shape."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


RERANK_ERRORS = error_responses(400, 401, 404, 413, 422, 500, 503)


@dataclass
class RerankService:
    """What the routes need from the replica: settings, the stages that score (one without a cascade)."""

    settings: ServeSettings
    stages: Sequence[StageScorer]
    metrics: RerankMetrics | None
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        """Rank through the stages with the cascade's k (none for a single model)."""
        stages = self.settings.stages
        counts = [stage.rerank_count or 0 for stage in stages[:-1]]
        self.ranker = CascadeRanker(self.stages, counts, stage_names(stages))

    @property
    def engine(self) -> StageScorer:
        """The last (most precise) stage: what ``/score`` uses; the only one without a cascade."""
        return self.stages[-1]

    @property
    def limits(self) -> RequestLimits:
        """The deployment's per-request limits."""
        serving = self.settings.serving
        return RequestLimits(serving.max_documents, serving.max_document_chars, serving.max_rerank_count)

    def check_model(self, requested: str | None) -> None:
        """Reject a request that names a model this server does not serve."""
        served = self.settings.served_model_name
        if requested and requested not in {served, self.settings.stages[-1].model}:
            raise ModelNotFoundError(f"model: {requested!r} is not served here; use {served!r}")

    def count(self, route: str) -> None:
        """Count one request of ``route``."""
        if self.metrics is not None:
            self.metrics.requests.inc(tags={"route": route})


def find_service(request: Request) -> RerankService | None:
    """The replica's service: on ``app.state`` (plain FastAPI) or the Serve replica's instance."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        try:
            service = getattr(serve.get_replica_context().servable_object, "service", None)
        except RayServeException:
            return None
    return service


def get_service(request: Request) -> RerankService:
    """Dependency: the replica's service (503 while the model is still loading)."""
    service = find_service(request)
    if service is None:
        raise OverloadedError("model is not loaded yet")
    return service


Service = Annotated[RerankService, Depends(get_service)]
_bearer = HTTPBearer(auto_error=False, description="Needed when the server has an API key.")


def require_api_key(
    service: Service, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Dependency: with an API key configured, ``Authorization: Bearer KEY`` (constant-time compare)."""
    key = service.settings.serving.api_key
    if key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise AuthenticationError("missing or invalid API key")


def _within_limits(body: Body, service: RerankService) -> Body:
    try:
        body.check_limits(service.limits)
    except ValueError as exc:
        raise RequestValidationError(str(exc)) from None
    return body


def rerank_body(body: RerankRequest, service: Service) -> RerankRequest:
    """Dependency: a Cohere / Jina / vLLM body within the deployment's limits."""
    return _within_limits(body, service)


def any_rerank_body(body: AnyRerankRequest, service: Service) -> RerankRequest | TEIRerankRequest:
    """Dependency: a ``/rerank`` body of either shape, within the deployment's limits."""
    return _within_limits(body, service)


def score_body(body: ScoreRequest, service: Service) -> ScoreRequest:
    """Dependency: a pair-scoring body within the deployment's limits."""
    return _within_limits(body, service)


def create_api() -> FastAPI:
    """The FastAPI app; a replica attaches its ``RerankService`` to ``app.state.service``."""
    app = FastAPI(
        title="ray-rerank",
        version="0.1.0",
        description="Cross-encoder reranking on Ray Serve.",
    )
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit)
    app.include_router(_rerank_routes(), dependencies=[Depends(require_api_key)])
    app.include_router(_info_routes())
    return app


class GuardedRoute(APIRoute):
    """A route whose unexpected errors become the generic 500 here, instead of propagating to the server.

    Starlette's catch-all handler answers and then re-raises; the error is answered and logged once here.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler, with unexpected exceptions answered by ``internal_error``."""
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (RerankError, StarletteHTTPException, FastAPIValidationError):
                raise  # their own handlers answer them
            except Exception as exc:
                return internal_error(request, exc)

        return guarded


def _rerank_routes() -> APIRouter:
    router = APIRouter(route_class=GuardedRoute)

    @router.post("/v1/rerank", response_model=RerankResponse, responses=RERANK_ERRORS)
    @router.post("/v2/rerank", response_model=RerankResponse, responses=RERANK_ERRORS)
    async def rerank_documents(
        body: Annotated[RerankRequest, Depends(rerank_body)], service: Service
    ) -> RerankResponse:
        """Cohere / Jina / vLLM rerank: sigmoid relevance, best first."""
        return await rerank_cohere(service, body)

    @router.post("/rerank", response_model=RerankResponse | list[TEIRank], responses=RERANK_ERRORS)
    async def rerank_any(
        body: Annotated[RerankRequest | TEIRerankRequest, Depends(any_rerank_body)], service: Service
    ) -> RerankResponse | list[TEIRank]:
        """``texts`` in the body: TEI rerank (a bare sorted array); ``documents``: Cohere / Jina / vLLM."""
        if isinstance(body, TEIRerankRequest):
            return await rerank_tei(service, body)
        return await rerank_cohere(service, body)

    @router.post("/score", response_model=ScoreResponse, responses=RERANK_ERRORS)
    async def score_pairs(
        body: Annotated[ScoreRequest, Depends(score_body)], service: Service
    ) -> ScoreResponse:
        """Score (query, passage) pairs; scores in input order (raw logits unless raw_scores=false)."""
        service.check_model(body.model)
        service.count("score")
        if body.instruction is not None and not await service.engine.accepts_instruction():
            raise RequestValidationError("instruction: the served model takes none (not an LLM reranker)")
        queries, passages = [q for q, _ in body.pairs], [p for _, p in body.pairs]
        scored = await service.engine.score(queries, passages, instruction=body.instruction)
        scores = scored.scores if body.raw_scores else sigmoid(scored.scores)
        return ScoreResponse(
            model=service.settings.served_model_name,
            scores=scores.tolist(),
            usage=Usage(total_tokens=scored.num_tokens),
        )

    return router


async def rerank_cohere(service: RerankService, body: RerankRequest) -> RerankResponse:
    """Score the documents (each cut to ``max_tokens_per_doc`` tokens) and sort them best first."""
    service.check_model(body.model)
    service.count("rerank")
    documents = body.texts()
    truncation = Truncation(max_passage_tokens=body.max_tokens_per_doc)
    ranked = await service.ranker.rank(body.query, documents, truncation, body.rerank_count, body.instruction)
    relevance = sigmoid(ranked.scores)
    results = [
        RerankResult(
            index=int(i),
            relevance_score=float(relevance[i]),
            document=RerankDocument(text=documents[i]) if body.return_documents else None,
            stage_scores=stage_scores(service, ranked, i, sigmoid) if body.return_stage_scores else None,
        )
        for i in ranked.order[: body.top_n]
    ]
    return RerankResponse(
        id=str(uuid.uuid4()),
        model=service.settings.served_model_name,
        results=results,
        usage=Usage(total_tokens=ranked.num_tokens),
        meta=RerankMeta(
            tokens=InputTokens(input_tokens=ranked.num_tokens), truncated_documents=ranked.num_truncated
        ),
    )


def stage_scores(
    service: RerankService, ranked: Ranked, index: int, activation: Callable[[np.ndarray], np.ndarray]
) -> dict[str, float | None]:
    """One document's score at each stage (through the route's activation), null where it did not reach it."""
    scores = activation(np.array([stage[index] for stage in ranked.stage_scores], dtype=np.float32))
    return {
        name: None if np.isnan(score) else float(score)
        for name, score in zip(service.ranker.names, scores, strict=True)
    }


async def rerank_tei(service: RerankService, body: TEIRerankRequest) -> list[TEIRank]:
    """TEI rerank: every text scored and sorted, truncated from ``truncation_direction``."""
    service.count("rerank_tei")
    truncation = Truncation(side=body.truncation_direction)
    ranked = await service.ranker.rank(
        body.query, body.texts, truncation, body.rerank_count, body.instruction
    )
    if not body.truncate and ranked.num_truncated:
        raise PayloadTooLargeError(
            f"texts: {ranked.num_truncated} inputs exceed {service.ranker.max_length} tokens "
            "and truncate is false"
        )
    activation = _identity if body.raw_scores else sigmoid
    scores = activation(ranked.scores)
    return [
        TEIRank(
            index=int(i),
            score=float(scores[i]),
            text=body.texts[i] if body.return_text else None,
            stage_scores=stage_scores(service, ranked, i, activation) if body.return_stage_scores else None,
        )
        for i in ranked.order
    ]


def _identity(scores: np.ndarray) -> np.ndarray:
    return scores


def _info_routes() -> APIRouter:
    router = APIRouter(route_class=GuardedRoute)

    @router.get("/health", response_model=Health, responses=error_responses(500, 503))
    async def health(service: Service) -> Health:
        """200 when the model scored a batch or a probe within the health interval, else 503."""
        try:
            refused = await service.ranker.health_check()
        except RuntimeError as exc:
            raise OverloadedError(str(exc)) from exc
        return Health(config_refused=refused)

    @router.get(
        "/v1/models",
        response_model=ModelList,
        dependencies=[Depends(require_api_key)],
        responses=error_responses(401, 500, 503),
    )
    async def list_models(service: Service) -> ModelList:
        """OpenAI-style model list, with what kind of reranker is served (each stage of a cascade)."""
        stages = []
        for name, options, stage in zip(
            service.ranker.names, service.settings.stages, service.stages, strict=True
        ):
            takes = await stage.accepts_instruction()
            stages.append(
                StageCard(name=name, model=options.model, kind=await stage.kind(), takes_instruction=takes)
            )
        card = ModelCard(
            id=service.settings.served_model_name,
            created=service.started,
            kind=stages[-1].kind,
            takes_instruction=any(stage.takes_instruction for stage in stages),
            stages=stages,
        )
        return ModelList(data=[card])

    return router


def error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error shape: ``{"error": {"type", "message"}}``."""
    body = ErrorResponse.model_validate({"error": {"type": error_type, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _count_error(request: Request, error_type: str) -> None:
    service = find_service(request)
    if service is not None and service.metrics is not None:
        service.metrics.errors.inc(tags={"type": error_type})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RerankError)
    async def on_domain_error(request: Request, exc: RerankError) -> JSONResponse:
        if status_of(exc) == 500:  # e.g. a ConfigError: the server's fault, not the client's
            return internal_error(request, exc)
        _count_error(request, exc.error_type)
        headers = None
        if isinstance(exc, OverloadedError | ReplicaLostError):
            service = find_service(request)
            retry_after = service.settings.serving.retry_after_s if service is not None else 1
            headers = {"Retry-After": str(retry_after)}
        return error_response(status_of(exc), exc.error_type, str(exc), headers)

    @app.exception_handler(FastAPIValidationError)
    async def on_request_validation(request: Request, exc: FastAPIValidationError) -> JSONResponse:
        error = request_error(list(exc.errors()))
        _count_error(request, error.error_type)
        return error_response(status_of(error), error.error_type, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        _count_error(request, "http_error")
        return error_response(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request, exc)


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """500 with a request id and a generic message; the detail goes to the log under that id only."""
    request_id = uuid.uuid4().hex
    logger.error(
        "internal error, request id %s, %s %s: %s: %s",
        request_id,
        request.method,
        request.url.path,
        type(exc).__name__,
        exc,
        exc_info=exc,
    )
    _count_error(request, "internal_error")
    message = f"internal error; request id {request_id} (the server log has the details)"
    return error_response(500, "internal_error", message, {REQUEST_ID_HEADER: request_id})


def request_error(errors: list[Any]) -> RerankError:
    """FastAPI's validation errors as ours: unparseable bodies are 400, the rest 422 naming the field."""
    for error in errors:
        if error.get("type") == "json_invalid":
            return InvalidRequestError(f"body is not valid JSON: {error.get('ctx', {}).get('error', '')}")
        if tuple(error.get("loc", ())) == ("body",) and error.get("type") != "missing":
            return InvalidRequestError("body must be a JSON object")
    return RequestValidationError(describe_errors(errors))


def describe_errors(errors: list[Any]) -> str:
    """Pydantic errors as ``field: message; ...`` (the field path is always named)."""
    parts = []
    for error in errors:
        path = [str(part) for part in error.get("loc", ()) if part != "body" and part not in UNION_TAGS]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(path) or 'body'}: {message}")
    return "; ".join(parts)


class BodySizeLimit:
    """ASGI middleware: 413 for a body over the replica's ``max_body_bytes``, before any parsing.

    The body is read here (up to the limit) and handed on whole, so a chunked upload without a
    ``Content-Length`` is bounded too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body up to the limit, then pass the request on (or answer 413)."""
        service = find_service(Request(scope)) if scope["type"] == "http" else None
        if service is None:
            await self.app(scope, receive, send)
            return
        limit = service.settings.serving.max_body_bytes
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                error = PayloadTooLargeError(f"request body exceeds {limit} bytes")
                _count_error(Request(scope), error.error_type)
                await error_response(413, error.error_type, str(error))(scope, receive, send)
                return
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that first returns the already-read body, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
