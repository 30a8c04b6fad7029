"""HTTP edge: the FastAPI app that serves every API dialect. Errors become HTTP answers only here.

Each dialect (``serve.dialects``) is mounted on its paths, its request typed (validated and documented
by FastAPI; a path several dialects share takes the union, told apart by each one's ``claims``), and
handed with the replica's ``RerankService`` (``serve.core``) to the dialect's handler. The API-key
check, the body-size limit and the one error shape are here.

No ``from __future__ import annotations`` here: Serve pickles the app to its replicas, and FastAPI
needs the annotations as objects there, not as strings to resolve against the module's globals.
"""

import inspect
import logging
import re
import secrets
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Union

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Discriminator, Tag
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reranker.errors import RerankError
from serve.core import RerankService
from serve.dialects import Dialect, all_dialects, by_path, dialect_of
from serve.errors import (
    AuthenticationError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    ReplicaLostError,
    RequestValidationError,
    status_of,
)
from serve.schemas import ErrorResponse, Health, ModelCard, ModelList, StageCard

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
_UNION_TAGS = {dialect.tag for dialect in all_dialects()}  # in a shared path's errors


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
    for path, dialects in by_path(all_dialects()).items():
        router.add_api_route(
            path,
            _endpoint(dialects, path),
            methods=["POST"],
            response_model=_response_model(dialects),
            responses=RERANK_ERRORS,
            summary=" | ".join(dialect.name for dialect in dialects),
            description="\n\n".join(dialect.summary for dialect in dialects),
            operation_id="post_" + path.strip("/").replace("/", "_"),
        )
    return router


def _endpoint(dialects: list[Dialect], path: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The handler of one path: the body in whichever of its dialects it is, answered by that one.

    A path parameter (``/v1/retrieval/{model_path}/reranking``) is declared, for OpenAPI, and unused.
    """

    async def endpoint(body: Any, service: RerankService, **_path: str) -> Any:
        return await dialect_of(dialects, body).handle(service, body)

    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [
        inspect.Parameter("body", keyword, annotation=_request_model(dialects)),
        inspect.Parameter("service", keyword, annotation=Service),
        *(
            inspect.Parameter(name, keyword, annotation=Annotated[str, Path(description="Not used.")])
            for name in re.findall(r"{(\w+)}", path)
        ),
    ]
    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return endpoint


def _request_model(dialects: list[Dialect]) -> Any:
    """The body of a path: its one dialect's request, or the union of its dialects', told apart by claims."""
    if len(dialects) == 1:
        return dialects[0].request
    members = tuple(Annotated[dialect.request, Tag(dialect.tag)] for dialect in dialects)
    return Annotated[Union[members], Discriminator(lambda body: dialect_of(dialects, body).tag)]  # noqa: UP007


def _response_model(dialects: list[Dialect]) -> Any:
    responses = tuple(dialect.response for dialect in dialects)
    return responses[0] if len(responses) == 1 else Union[responses]  # noqa: UP007


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
    body = ErrorResponse.model_validate(
        {"error": {"type": error_type, "message": message}, "detail": message}
    )
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
        if field_path(error) == [] and not isinstance(error.get("input"), dict):
            return InvalidRequestError("body must be a JSON object")
    return RequestValidationError(describe_errors(errors))


def field_path(error: Any) -> list[str]:
    """Where in the body a validation error is: its loc without ``body`` and a shared path's dialect tag."""
    return [str(part) for part in error.get("loc", ()) if part != "body" and part not in _UNION_TAGS]


def describe_errors(errors: list[Any]) -> str:
    """Pydantic errors as ``field: message; ...`` (the field path is always named)."""
    parts = []
    for error in errors:
        path = field_path(error)
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
