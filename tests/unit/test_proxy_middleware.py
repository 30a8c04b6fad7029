"""The proxy middleware that retries a request whose replica died (serve/proxy.py), on a fake proxy app."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serve.proxy import RETRIES, RETRY_AFTER_S, ReplicaLossRetry, proxy_middlewares
from serve.schemas import ErrorResponse

BODY = json.dumps({"query": "q", "documents": ["a", "b"]}).encode()


class FakeProxy:
    """Stands in for Serve's proxy app: answers each call from a script; ``None`` = the replica died."""

    def __init__(self, *answers: int | None, client_leaves: bool = False) -> None:
        self.answers, self.client_leaves = list(answers), client_leaves
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        if self.client_leaves:
            assert (await receive())["type"] == "http.disconnect"
            return
        status = self.answers.pop(0)
        if status is None:
            return  # what Serve's proxy does on a dead replica: no response, then uvicorn's bare 500
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b'{"ok": true}', "more_body": False})


def call(app: Any, body: bytes = BODY, chunks: int = 1, headers: list | None = None) -> list[dict]:
    """Run one HTTP request (its body in ``chunks`` parts) through ``app``; the messages it sent."""
    size = -(-len(body) // chunks)
    incoming = [
        {"type": "http.request", "body": body[i : i + size], "more_body": i + size < len(body)}
        for i in range(0, len(body), size)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/rerank", "headers": headers or []}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_request_whose_replica_died_is_sent_again_with_the_same_body():
    """The proxy left the first try unanswered: the second try gets the body again and its 200 goes out."""
    proxy = FakeProxy(None, 200)
    sent = call(ReplicaLossRetry(proxy), chunks=3)
    assert sent[0]["status"] == 200
    assert proxy.bodies == [BODY, BODY]


def test_every_try_lost_is_the_designed_503_with_retry_after():
    """When each try loses its replica, the client gets 503, Retry-After and the one error shape."""
    proxy = FakeProxy(*[None] * (1 + RETRIES))
    start, body = call(ReplicaLossRetry(proxy))
    assert start["status"] == 503
    assert dict(start["headers"])[b"retry-after"] == str(RETRY_AFTER_S).encode()
    error = ErrorResponse.model_validate_json(body["body"]).error
    assert error.type == "replica_unavailable"
    assert len(proxy.bodies) == 1 + RETRIES


@pytest.mark.parametrize("status", [200, 422, 500, 503])
def test_an_answer_the_app_started_is_passed_through_once(status):
    """A response that started (the app's own 500, Serve's back-pressure 503) is never retried."""
    proxy = FakeProxy(status)
    sent = call(ReplicaLossRetry(proxy))
    assert sent[0]["status"] == status
    assert len(proxy.bodies) == 1


def test_a_client_that_hung_up_is_not_retried():
    """The client left mid-request: no second try and nothing sent (its queue slot is freed)."""
    proxy = FakeProxy(client_leaves=True)
    assert call(ReplicaLossRetry(proxy)) == []
    assert len(proxy.bodies) == 1


def test_a_body_too_large_to_keep_gets_one_try_then_the_503(monkeypatch):
    """A body declared over the buffer cap streams through untouched; its lost replica is a 503, no retry."""
    monkeypatch.setattr("serve.proxy.MAX_BUFFERED_BODY_BYTES", 10)
    proxy = FakeProxy(None, 200)
    sent = call(ReplicaLossRetry(proxy), headers=[(b"content-length", str(len(BODY)).encode())])
    assert sent[0]["status"] == 503
    assert proxy.bodies == [BODY]


def test_non_http_scopes_pass_straight_through():
    """Lifespan and websocket scopes reach the proxy app as they came."""
    seen: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    asyncio.run(ReplicaLossRetry(app)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def test_serve_accepts_the_callback():
    """Serve's own check of a proxy callback's return value passes on ours."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    assert [m.cls for m in validate_http_proxy_callback_return(proxy_middlewares())] == [ReplicaLossRetry]
