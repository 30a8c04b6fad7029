"""A middleware for Serve's HTTP proxy: a scoring request whose replica died is retried once, else a 503.

When a replica dies with requests in flight (a SIGKILL, the OOM killer, a lost node), Serve's proxy
answers each of them 500 and no body: its ASGI app returns without starting a response. Scoring is
idempotent, so :class:`ReplicaLossRetry` sends such a request again (the router has by then taken the
dead replica out of rotation), and answers the designed 503 with ``Retry-After`` in the service's error
shape when that retry was lost too or the dead replica's retry budget is spent. It retries only when
all of these hold, and otherwise leaves the proxy's own answer untouched:

- the request is a ``POST`` to one of this service's scoring routes (:data:`SCORING_ROUTES`);
- its body was kept whole: at most :data:`PROXY_BUFFER_ENV` bytes (default 1 MiB, never above
  ``RERANK_MAX_BODY_BYTES`` when that is set in the proxy's environment), while all requests of the
  proxy together keep at most :data:`PROXY_BUFFER_TOTAL_ENV` bytes (default 64 MiB); past either cap the
  body streams through unbuffered, so a large or chunked upload is never held before the replica's own
  API key, back-pressure and ``max_body_bytes`` checks;
- the try was lost to ``ray.exceptions.ActorDiedError`` (the replica process is gone: not a user
  exception), or to ``ActorUnavailableError`` (the replica can't be reached: what the proxy gets for the
  requests in flight when the replica's node is lost, before Ray declares the node dead; the replica may
  also be alive, and then the retry only repeats idempotent work), of a replica of one of this project's
  applications (:data:`PROXY_APPS_ENV`, default ``rerank``);
- it is the request's first try (:data:`RETRIES`), and the dead replica has caused fewer than
  :data:`RETRIES_PER_REPLICA_DEATH` retries (so a request that kills its replica takes at most one more).

Why the try was lost is known only inside Serve's proxy: Ray 2.60 has no hook for it. So the one place
that touches Ray internals is :func:`install_status_probe`: it wraps
``ray.serve._private.proxy.get_http_response_status``, which the proxy calls with the exception before
it answers, to also note that exception for the request being served (in a :class:`LostTry` the
middleware puts in a context variable), with the app the proxy routed the request to (Serve's request
context, ``ray.serve.context._serve_request_context``: an ``ActorUnavailableError`` does not name its
replica's class as an ``ActorDiedError`` does). It runs when Serve builds the middleware, inside the proxy
process; not at import, since ``python -m serve`` imports this module before it sets Serve's env. Where
that name is missing (another Ray version) it logs one warning and the middleware retries nothing; where
the request context is missing, an unreachable replica is not retried.

Serve loads it through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy:proxy_middlewares``,
which must be in the environment of the processes that start Ray for this app (``python -m serve``,
``cluster.yaml`` and the RayService pods set it; the image does not, so other apps built on it don't get
it). This module runs inside the proxy actor: it imports nothing of the model.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import ReplicaLostError, status_of
from serve.schemas import ErrorResponse
from serve.settings import (
    DEFAULT_APPS,
    DEFAULT_BUFFER_BYTES,
    DEFAULT_BUFFER_TOTAL_BYTES,
    MAX_BODY_ENV,
    PROXY_APPS_ENV,
    PROXY_BUFFER_ENV,
    PROXY_BUFFER_TOTAL_ENV,
)

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve.proxy:proxy_middlewares"
SCORING_ROUTES = frozenset(  # idempotent POST routes: every dialect's paths (serve.dialects; a test checks)
    {
        "/v1/rerank",
        "/v2/rerank",
        "/rerank",
        "/infinity/rerank",
        "/score",
        "/v1/score",
        "/v1/ranking",
        "/reranking",
    }
)
RETRIES = 1  # tries after the first; it lands on a live replica once the router knows
RETRIES_PER_REPLICA_DEATH = 32  # a replica's death makes at most this many retries (per proxy)
REMEMBERED_DEATHS = 256  # the retry budgets of older deaths are forgotten
RETRY_AFTER_S = 1  # another replica usually answers at once; a replacement takes ~20 s on a laptop
LOST_REPLICA_LOG = "request lost its replica"
PATCHED_MODULE = "ray.serve._private.proxy"
PATCHED_NAME = "get_http_response_status"
REQUEST_CONTEXT_MODULE = "ray.serve.context"  # Serve's proxy sets it (with the app) for each request
REQUEST_CONTEXT_NAME = "_serve_request_context"
logger = logging.getLogger("ray.serve")  # into the proxy's log file, beside Serve's own lines

_REPLICA_CLASS = re.compile(r"^\s*class_name: ServeReplica:(?P<app>.+):(?P<deployment>[^:\n]+)$", re.M)
_PROBE_MARK = "_rerank_status_probe"


@dataclass
class LostTry:
    """What Serve's proxy reported for one try of a request.

    The exception it turned into a status, and the app it had routed the request to (``None``: not known).
    """

    error: BaseException | None = None
    app: str | None = None


_CURRENT_TRY: ContextVar[LostTry | None] = ContextVar("rerank_proxy_current_try", default=None)


def install_status_probe() -> bool:
    """Wrap Serve's ``get_http_response_status`` to note each try's exception; ``False`` if it can't.

    The only touch of Ray internals here (Ray 2.60 exposes no hook for why a try was lost); installing
    twice wraps once.
    """
    try:
        module = importlib.import_module(PATCHED_MODULE)
        original = getattr(module, PATCHED_NAME)
    except (ImportError, AttributeError):
        logger.warning("%s.%s not found (another Ray version?): serve.proxy retries no request",
                       PATCHED_MODULE, PATCHED_NAME)  # fmt: skip
        return False
    if not getattr(original, _PROBE_MARK, False):
        setattr(module, PATCHED_NAME, _noting(original, _request_context_var()))
    return True


def _request_context_var() -> ContextVar[Any] | None:
    """Serve's per-request context variable (its value names the request's app); ``None`` if missing."""
    try:
        context = importlib.import_module(REQUEST_CONTEXT_MODULE)
    except ImportError:
        return None
    variable = getattr(context, REQUEST_CONTEXT_NAME, None)
    return variable if isinstance(variable, ContextVar) else None


def _noting(original: Callable[..., Any], request_context: ContextVar[Any] | None) -> Callable[..., Any]:
    """``original``, which also stores its exception and the request's app in its :class:`LostTry`."""

    @functools.wraps(original)
    def get_http_response_status(exc: BaseException, *args: Any, **kwargs: Any) -> Any:
        lost = _CURRENT_TRY.get()
        if lost is not None:
            lost.error = exc
            routed = request_context.get(None) if request_context is not None else None
            lost.app = getattr(routed, "app_name", None) or None
        return original(exc, *args, **kwargs)

    setattr(get_http_response_status, _PROBE_MARK, True)
    return get_http_response_status


def proxy_middlewares() -> list[Middleware]:
    """The middlewares Serve's proxy wraps its app in (the callback named by the env var)."""
    return [Middleware(ReplicaLossRetry)]


@dataclass(frozen=True)
class ProxyConfig:
    """The middleware's settings, read once from the proxy process's environment."""

    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    total_buffer_bytes: int = DEFAULT_BUFFER_TOTAL_BYTES
    apps: frozenset[str] = frozenset({DEFAULT_APPS})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ProxyConfig:
        """The settings from ``environ``; the per-request cap never above ``RERANK_MAX_BODY_BYTES``."""
        buffer_bytes = _env_bytes(environ, PROXY_BUFFER_ENV, DEFAULT_BUFFER_BYTES)
        buffer_bytes = min(buffer_bytes, _env_bytes(environ, MAX_BODY_ENV, buffer_bytes))
        apps = environ.get(PROXY_APPS_ENV, DEFAULT_APPS).split(",")
        return cls(
            buffer_bytes=buffer_bytes,
            total_buffer_bytes=_env_bytes(environ, PROXY_BUFFER_TOTAL_ENV, DEFAULT_BUFFER_TOTAL_BYTES),
            apps=frozenset(app.strip() for app in apps if app.strip()),
        )


def _env_bytes(environ: Mapping[str, str], name: str, default: int) -> int:
    """A whole number of bytes from ``environ``; a malformed value is logged and the default kept.

    Never raises: the middleware is built in the node's shared proxy, whose failure would take HTTP
    down for every application on the node.
    """
    value = environ.get(name, "").strip()
    if value.isdigit():
        return int(value)
    if value:
        logger.warning("%s=%r is not a whole number of bytes; using %d", name, value, default)
    return default


class BufferPool:
    """The bytes all requests of one proxy keep for a retry, bounded by ``total``."""

    def __init__(self, total: int) -> None:
        """A pool of ``total`` bytes, none taken."""
        self.total, self.used = total, 0

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes if they fit."""
        if self.used + size > self.total:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        """Give back ``size`` bytes taken before."""
        self.used -= size


class DeathBudgets:
    """Retries left per dead replica (its actor id); only the latest ``remembered`` deaths are kept."""

    def __init__(
        self, per_death: int = RETRIES_PER_REPLICA_DEATH, remembered: int = REMEMBERED_DEATHS
    ) -> None:
        """Each death allows ``per_death`` retries."""
        self.per_death, self.remembered = per_death, remembered
        self._left: OrderedDict[str, int] = OrderedDict()

    def take(self, actor_id: str) -> bool:
        """Use one retry of this death's budget; ``False`` when it is spent."""
        left = self._left.pop(actor_id, self.per_death)
        self._left[actor_id] = max(left - 1, 0)
        while len(self._left) > self.remembered:
            self._left.popitem(last=False)
        return left > 0


@dataclass(frozen=True)
class Loss:
    """Why a try was lost: ``actor_id`` of the dead replica when a retry may help, else ``None``."""

    reason: str
    actor_id: str | None = None


def classify_loss(error: BaseException | None, apps: frozenset[str], app: str | None = None) -> Loss:
    """Whether ``error`` says a replica of one of ``apps`` is gone or can't be reached, and why not.

    Gone: its process died. Can't be reached: its node was lost, or it is cut off (it may be alive).
    ``app``: the app the proxy routed the request to.
    """
    if error is None:
        return Loss("the proxy noted no exception")
    if isinstance(error, RayTaskError):  # also one whose cause is an ActorDiedError downstream
        return Loss(f"a user exception ({type(error).__name__}), not a dead replica")
    if isinstance(error, ActorUnavailableError):
        return _unreachable(error, apps, app)
    if not isinstance(error, ActorDiedError):
        return Loss(f"{type(error).__name__}, not a dead replica")
    match = _REPLICA_CLASS.search(str(error))
    if match is None or not error.actor_id:
        return Loss("the dead actor is not a known Serve replica")
    if match["app"] not in apps:
        return Loss(f"the dead replica is of app {match['app']!r}, not of {sorted(apps)}")
    return Loss(f"replica {error.actor_id} of app {match['app']!r} died", error.actor_id)


def _unreachable(error: ActorUnavailableError, apps: frozenset[str], app: str | None) -> Loss:
    """An unreachable replica: its app is the one the request was routed to (the error does not name it)."""
    if app is None or not error.actor_id:
        return Loss("the replica is unreachable (ActorUnavailableError) and its app is not known")
    if app not in apps:
        return Loss(f"the unreachable replica is of app {app!r}, not of {sorted(apps)}")
    return Loss(f"replica {error.actor_id} of app {app!r} is unreachable (its node lost?)", error.actor_id)


@dataclass
class _Body:
    """The request body as read so far: whole (``complete``, replayable), or a head to stream on from."""

    messages: list[Message] = field(default_factory=list)
    complete: bool = False
    reserved: int = 0
    disconnected: bool = False


@dataclass
class _Attempt:
    """What one pass through the proxy app did: started a response, or saw the client leave."""

    receive: Receive
    pending: list[Message]
    started: bool = False
    disconnected: bool = False

    async def replay(self) -> Message:
        """The body's messages read so far first, then the client's own (more body, its disconnect)."""
        if self.pending:
            return self.pending.pop(0)
        message = await self.receive()
        self.disconnected = self.disconnected or message["type"] == "http.disconnect"
        return message


class ReplicaLossRetry:
    """Retries once a scoring request whose replica died; a 503 when that is lost too or not allowed."""

    def __init__(self, app: ASGIApp, retries: int = RETRIES, config: ProxyConfig | None = None) -> None:
        """Wrap the proxy's ASGI ``app``; ``config`` defaults to the environment's."""
        self.app, self.retries = app, retries
        self.config = config or ProxyConfig.from_env()
        self.pool = BufferPool(self.config.total_buffer_bytes)
        self.deaths = DeathBudgets()
        self.probing = install_status_probe()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request; any other request or scope passes through untouched."""
        if not (self.probing and _retryable_route(scope)):
            await self.app(scope, receive, send)
            return
        body = _Body()
        try:
            await self._read_body(scope, receive, body)
            if not body.disconnected:
                await self._serve(scope, receive, send, body)
        finally:
            self.pool.release(body.reserved)

    async def _read_body(self, scope: Scope, receive: Receive, body: _Body) -> None:
        """Keep the body while it fits both caps; the message that does not is the last one read."""
        cap = self.config.buffer_bytes
        if _declared_length(scope) > cap:
            return
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                body.disconnected = True
                return
            body.messages.append(message)
            chunk = len(message.get("body", b""))
            if body.reserved + chunk > cap or not self.pool.reserve(chunk):
                return
            body.reserved += chunk
            if not message.get("more_body", False):
                whole = b"".join(m.get("body", b"") for m in body.messages)
                body.messages = [{"type": "http.request", "body": whole, "more_body": False}]
                body.complete = True
                return

    async def _serve(self, scope: Scope, receive: Receive, send: Send, body: _Body) -> None:
        """Pass the request to the proxy app; again after a lost try when allowed, else a 503 or nothing."""
        tries = 1 + self.retries
        for number in range(1, tries + 1):
            attempt = _Attempt(receive, list(body.messages) if body.complete else body.messages)
            lost = LostTry()
            token = _CURRENT_TRY.set(lost)
            try:
                await self.app(_fresh(scope), attempt.replay, _watching(attempt, send))
            finally:
                _CURRENT_TRY.reset(token)
            if attempt.started or attempt.disconnected:
                return
            step = self._after_loss(f"{scope['method']} {scope['path']}", lost, body.complete, number, tries)
            if step == "leave":
                return  # the proxy's own answer stands
            if step == "503":
                break
        await send_replica_lost(send)

    def _after_loss(self, request: str, lost: LostTry, kept: bool, number: int, tries: int) -> str:
        """What follows try ``number`` that got no response: ``retry``, ``503`` or ``leave``; logged."""
        loss = classify_loss(lost.error, self.config.apps, lost.app)
        if loss.actor_id is None or not kept:
            why = loss.reason if loss.actor_id is None else "its body streamed past the buffer cap"
            logger.warning("%s lost its try with no response; not retried: %s", request, why)
            return "leave"
        if number == tries:
            why = f"no retry left after try {number} of {tries} ({loss.reason})"
        elif not self.deaths.take(loss.actor_id):
            why = f"{loss.reason}, and its {self.deaths.per_death} retries are spent"
        else:
            logger.warning("%s %s (try %d of %d); retrying: %s", request, LOST_REPLICA_LOG, number, tries,
                           loss.reason)  # fmt: skip
            return "retry"
        logger.warning("%s %s; answering 503: %s", request, LOST_REPLICA_LOG, why)
        return "503"


def _retryable_route(scope: Scope) -> bool:
    """An HTTP ``POST`` to one of the scoring routes: the only requests ever kept and retried."""
    path = scope.get("path", "")
    return (
        scope["type"] == "http"
        and scope.get("method") == "POST"
        and any(path.endswith(route) for route in SCORING_ROUTES)
    )


def _fresh(scope: Scope) -> Scope:
    """The scope with its own header list (Serve's request-id middleware appends to it)."""
    return {**scope, "headers": list(scope.get("headers", []))}


def _watching(attempt: _Attempt, send: Send) -> Send:
    async def send_and_note(message: Message) -> None:
        attempt.started = attempt.started or message["type"] == "http.response.start"
        await send(message)

    return send_and_note


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length" and value.isdigit():
            return int(value)
    return 0


async def send_replica_lost(send: Send) -> None:
    """The designed answer when a retry was lost too or not allowed: 503, ``Retry-After``, the error shape."""
    error = ReplicaLostError("the replica serving this request stopped; retry the request")
    body = ErrorResponse.of(error.error_type, str(error))
    payload = body.model_dump_json().encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    await send({"type": "http.response.start", "status": status_of(error), "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
