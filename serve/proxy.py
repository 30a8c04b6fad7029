"""A middleware for Serve's HTTP proxy: a request whose replica died is retried, else a 503.

When a replica dies with requests in flight (a SIGKILL, the OOM killer, a lost node), Serve's proxy
answers each of them 500 and no body: its ASGI app returns without starting a response. Scoring
is idempotent, so :class:`ReplicaLossRetry` sends such a request again (the router has by then taken
the dead replica out of rotation) and, when every try was lost, answers the designed 503 with
``Retry-After`` in the service's error shape. A response the app started, a 503 from Serve's own
back-pressure, and a client that hung up pass through untouched.

Serve loads it through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy:proxy_middlewares``,
which must be in the environment of the processes that start Ray (``python -m serve`` sets it;
``cluster.yaml`` and the KubeRay manifests do too). This module runs inside the proxy actor: it
imports nothing of the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import ReplicaLostError, status_of
from serve.schemas import ErrorBody, ErrorResponse

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve.proxy:proxy_middlewares"
RETRIES = 2  # tries after the first; each one lands on a live replica once the router knows
RETRY_AFTER_S = 1  # another replica usually answers at once; a replacement takes ~20 s on a laptop
MAX_BUFFERED_BODY_BYTES = 32 * 1024 * 1024  # a larger body is not kept for a retry (still a 503)
LOST_REPLICA_LOG = "request lost its replica"
logger = logging.getLogger("ray.serve")  # into the proxy's log file, beside Serve's own lines


def proxy_middlewares() -> list[Middleware]:
    """The middlewares Serve's proxy wraps its app in (the callback named by the env var)."""
    return [Middleware(ReplicaLossRetry)]


@dataclass
class _Attempt:
    """What one pass through the proxy app did: started a response, or saw the client leave."""

    receive: Receive
    body: bytes | None
    started: bool = False
    disconnected: bool = False
    _body_sent: bool = field(default=False, repr=False)

    async def replay(self) -> Message:
        """The buffered body first, then the client's own messages (its disconnect)."""
        if self.body is not None and not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        message = await self.receive()
        self.disconnected = self.disconnected or message["type"] == "http.disconnect"
        return message


class ReplicaLossRetry:
    """Retries a request the proxy left unanswered (its replica died); a 503 once tries run out."""

    def __init__(self, app: ASGIApp, retries: int = RETRIES) -> None:
        """Wrap the proxy's ASGI ``app``."""
        self.app, self.retries = app, retries

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request; other scopes (websocket, lifespan) pass through."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive, scope)
        if disconnected:
            return
        tries = 1 + (self.retries if body is not None else 0)
        for number in range(1, tries + 1):
            attempt = _Attempt(receive, body)
            await self.app(_fresh(scope), attempt.replay, _watching(attempt, send))
            if attempt.started or attempt.disconnected:
                return
            then = "retrying" if number < tries else "answering 503"
            logger.warning("%s %s %s (try %d of %d); %s", scope["method"], scope["path"], LOST_REPLICA_LOG,
                           number, tries, then)  # fmt: skip
        await send_replica_lost(send)


def _fresh(scope: Scope) -> Scope:
    """The scope with its own header list (Serve's request-id middleware appends to it)."""
    return {**scope, "headers": list(scope.get("headers", []))}


def _watching(attempt: _Attempt, send: Send) -> Send:
    async def send_and_note(message: Message) -> None:
        attempt.started = attempt.started or message["type"] == "http.response.start"
        await send(message)

    return send_and_note


async def _read_body(receive: Receive, scope: Scope) -> tuple[bytes | None, bool]:
    """The whole request body (``None`` when it is too large to keep), and whether the client left."""
    if _declared_length(scope) > MAX_BUFFERED_BODY_BYTES:
        return None, False
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length" and value.isdigit():
            return int(value)
    return 0


async def send_replica_lost(send: Send) -> None:
    """The designed answer when every try lost its replica: 503, ``Retry-After``, the error shape."""
    error = ReplicaLostError("the replica serving this request stopped; retry the request")
    body = ErrorResponse(error=ErrorBody(type=error.error_type, message=str(error)))
    payload = body.model_dump_json().encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    await send({"type": "http.response.start", "status": status_of(error), "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
