"""The proxy middleware that retries a request whose replica died (serve/proxy.py), on a fake proxy app."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from serve.proxy import (
    RETRIES,
    RETRIES_PER_REPLICA_DEATH,
    RETRY_AFTER_S,
    DeathBudgets,
    ProxyConfig,
    ReplicaLossRetry,
    install_status_probe,
    proxy_middlewares,
)
from serve.schemas import ErrorResponse

BODY = json.dumps({"query": "q", "documents": ["a", "b"]}).encode()
MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def serve_proxy_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Ray's proxy module, whose ``get_http_response_status`` each test may wrap; put back afterwards."""
    module = importlib.import_module("ray.serve._private.proxy")
    monkeypatch.setattr(module, "get_http_response_status", module.get_http_response_status)
    return module


@pytest.fixture
def proxy_log() -> Iterator[list[str]]:
    """The lines the middleware logs to ``ray.serve`` (which does not propagate to the root logger)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def died(app: str = "rerank", actor: int = 1) -> ActorDiedError:
    """The error Serve's proxy gets when a replica's process is gone, as Ray 2.60 builds it."""
    context = ActorDiedErrorContext(
        class_name=f"ServeReplica:{app}:Reranker",
        actor_id=actor.to_bytes(16, "big"),
        pid=4242,
        name=f"SERVE_REPLICA::{app}#Reranker#abcd",
        ray_namespace="serve",
        error_message="The actor is dead because its worker process has died.",
    )
    return ActorDiedError(context)


def unreachable(actor: int = 3) -> ActorUnavailableError:
    """The error Serve's proxy gets for a request in flight on a replica whose node was lost (Ray 2.60)."""
    reason = "The actor is temporarily unavailable: RpcError: recvmsg:Connection reset by peer rpc_code: 14"
    return ActorUnavailableError(reason, actor.to_bytes(16, "big"))


def user_exception() -> RayTaskError:
    """The error of a replica's code that raised (its process lives on)."""
    return RayTaskError("__call__", "Traceback: ValueError: boom", ValueError("boom")).as_instanceof_cause()


def downstream_death() -> RayTaskError:
    """A replica's code that raised an ``ActorDiedError`` of a replica it called (a ``RayTaskError`` too)."""
    cause = ActorDiedError()
    cause.actor_id = "00" * 15 + "09"
    cause.error_msg = f"{ActorDiedError.BASE_ERROR_MSG}\n\tclass_name: ServeReplica:rerank:Stage\n"
    return RayTaskError("__call__", f"Traceback:\n{cause}", cause).as_instanceof_cause()


class FakeProxy:
    """Stands in for Serve's proxy app: answers each call from a script. A status starts a response; an
    exception is a try that lost its replica: the app hands it to Serve's ``get_http_response_status``
    (where the real proxy does, and which serve.proxy wraps) and returns without a response.
    ``routed_app``: the app Serve's proxy routed the request to, set in Serve's request context as it does.
    """

    def __init__(
        self,
        *answers: int | BaseException,
        client_leaves: bool = False,
        in_task: bool = False,
        routed_app: str | None = None,
    ) -> None:
        self.answers, self.client_leaves, self.in_task = list(answers), client_leaves, in_task
        self.routed_app = routed_app
        self.bodies: list[bytes] = []
        self.message_sizes: list[list[int]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        chunks: list[bytes] = []
        more_body = True
        while more_body:
            message = await receive()
            chunks.append(message["body"])
            more_body = message.get("more_body", False)
        self.bodies.append(b"".join(chunks))
        self.message_sizes.append([len(chunk) for chunk in chunks])
        if self.client_leaves:
            assert (await receive())["type"] == "http.disconnect"
            return
        answer = self.answers.pop(0)
        if self.routed_app is not None:
            from ray.serve.context import _RequestContext, _serve_request_context

            _serve_request_context.set(_RequestContext(app_name=self.routed_app))
        if isinstance(answer, BaseException):
            note = self.note(answer)
            await (asyncio.create_task(note) if self.in_task else note)  # a task runs in a copied context
            return  # what Serve's proxy does on a 500: no response, then uvicorn's bare 500
        await send({"type": "http.response.start", "status": answer, "headers": []})
        await send({"type": "http.response.body", "body": b'{"ok": true}', "more_body": False})

    async def note(self, error: BaseException) -> None:
        module = importlib.import_module("ray.serve._private.proxy")
        status_of = getattr(module, "get_http_response_status", None)
        if status_of is not None:
            status_of(error, None, "request-id")


async def request(
    app: Any,
    body: bytes = BODY,
    chunks: int = 1,
    method: str = "POST",
    path: str = "/v1/rerank",
    headers: Any = None,
) -> list[dict]:
    """Send one HTTP request (its body in ``chunks`` parts) through ``app``; the messages it sent."""
    size = -(-len(body) // chunks)
    incoming = [
        {"type": "http.request", "body": body[i : i + size], "more_body": i + size < len(body)}
        for i in range(0, len(body), size)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.sleep(0)  # as a socket would: other requests run meanwhile
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers or []}
    await app(scope, receive, send)
    return sent


def call(app: Any, body: bytes = BODY, chunks: int = 1, **options: Any) -> list[dict]:
    """:func:`request`, run to its end."""
    return asyncio.run(request(app, body, chunks, **options))


def assert_replica_lost_503(sent: list[dict]) -> None:
    start, body = sent
    assert start["status"] == 503
    assert dict(start["headers"])[b"retry-after"] == str(RETRY_AFTER_S).encode()
    assert ErrorResponse.model_validate_json(body["body"]).error.type == "replica_unavailable"


def test_a_request_whose_replica_died_is_sent_again_with_the_same_body():
    """The replica process died on the first try: the second try gets the body again; its 200 goes out."""
    proxy = FakeProxy(died(), 200)
    sent = call(ReplicaLossRetry(proxy), chunks=3)
    assert sent[0]["status"] == 200
    assert proxy.bodies == [BODY, BODY]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank", "/score", "/api/v1/rerank"])
def test_each_scoring_route_is_retried(path):
    """Every idempotent scoring route of the service, also behind a route prefix."""
    proxy = FakeProxy(died(), 200)
    assert call(ReplicaLossRetry(proxy), path=path)[0]["status"] == 200
    assert len(proxy.bodies) == 2


def test_the_lost_try_is_known_though_serve_notes_it_in_a_copied_context():
    """The proxy may note the exception in a task (a copy of the request's context): still retried."""
    proxy = FakeProxy(died(), 200, in_task=True)
    assert call(ReplicaLossRetry(proxy))[0]["status"] == 200


def test_a_retry_lost_too_is_the_designed_503_with_retry_after():
    """One retry only: when it loses its replica too, the client gets 503, Retry-After and the error shape."""
    assert RETRIES == 1
    proxy = FakeProxy(died(actor=1), died(actor=2))
    assert_replica_lost_503(call(ReplicaLossRetry(proxy)))
    assert len(proxy.bodies) == 2


@pytest.mark.parametrize(
    ("method", "path", "error"),
    [
        ("POST", "/v1/embeddings", died()),
        ("POST", "/v1/rerank/", died()),
        ("GET", "/v1/rerank", died()),
        ("POST", "/v1/rerank", user_exception()),
        ("POST", "/v1/rerank", downstream_death()),
        ("POST", "/v1/rerank", unreachable()),
        ("POST", "/v1/rerank", died(app="other")),
        ("POST", "/v1/rerank", RuntimeError("something else")),
    ],
    ids=[
        "not-a-scoring-route",
        "not-exactly-a-scoring-route",
        "GET",
        "RayTaskError",
        "RayTaskError-caused-by-ActorDiedError",
        "ActorUnavailableError-app-not-known",
        "replica-of-another-app",
        "other-exception",
    ],
)
def test_a_lost_try_that_a_retry_may_not_mend_is_left_to_the_proxy(method, path, error):
    """Not retried and not answered by the middleware: the client gets the proxy's own bare 500."""
    proxy = FakeProxy(error, 200)
    assert call(ReplicaLossRetry(proxy), method=method, path=path) == []
    assert len(proxy.bodies) == 1


@pytest.mark.parametrize("in_task", [False, True])
def test_a_request_whose_replica_is_unreachable_is_sent_again(in_task):
    """Its node was lost (ActorUnavailableError, before Ray declares the node dead): the proxy routed the
    request to this app, so it is sent again, with the same body; the second try's 200 goes out."""
    proxy = FakeProxy(unreachable(), 200, routed_app="rerank", in_task=in_task)
    assert call(ReplicaLossRetry(proxy))[0]["status"] == 200
    assert proxy.bodies == [BODY, BODY]


def test_an_unreachable_replica_twice_is_the_designed_503():
    """Its retry can't reach a replica either: 503, Retry-After and the error shape, never the bare 500."""
    proxy = FakeProxy(unreachable(actor=3), unreachable(actor=4), routed_app="rerank")
    assert_replica_lost_503(call(ReplicaLossRetry(proxy)))
    assert len(proxy.bodies) == 2


def test_an_unreachable_replica_of_another_app_is_left_to_the_proxy(proxy_log):
    """The request was routed to another app: not retried, the proxy's own answer."""
    proxy = FakeProxy(unreachable(), 200, routed_app="other")
    assert call(ReplicaLossRetry(proxy)) == []
    assert len(proxy.bodies) == 1
    assert any("not retried: the unreachable replica is of app 'other'" in line for line in proxy_log)


def test_serve_has_the_request_context_the_probe_reads():
    """Ray's Serve still exposes the per-request context variable that names the request's app."""
    from serve.proxy import _request_context_var

    assert _request_context_var() is not None


def test_the_apps_whose_replicas_may_be_retried_come_from_the_env(monkeypatch):
    """``RERANK_PROXY_APPS`` names them (default ``rerank``)."""
    monkeypatch.setenv("RERANK_PROXY_APPS", "scoring, other")
    proxy = FakeProxy(died(app="other"), 200, died(app="rerank"), 200)
    middleware = ReplicaLossRetry(proxy)
    assert call(middleware)[0]["status"] == 200
    assert call(middleware) == []
    assert len(proxy.bodies) == 3


def test_a_dead_replica_causes_at_most_its_budget_of_retries():
    """N + 1 requests lost to the same dead replica: N are retried, the next gets the 503 after one try;
    another replica's death has its own budget."""
    proxy = FakeProxy(*[died(actor=7), 200] * RETRIES_PER_REPLICA_DEATH, died(actor=7), died(actor=8), 200)
    middleware = ReplicaLossRetry(proxy)
    for _ in range(RETRIES_PER_REPLICA_DEATH):
        assert call(middleware)[0]["status"] == 200
    assert len(proxy.bodies) == 2 * RETRIES_PER_REPLICA_DEATH
    assert_replica_lost_503(call(middleware))
    assert len(proxy.bodies) == 2 * RETRIES_PER_REPLICA_DEATH + 1
    assert call(middleware)[0]["status"] == 200


def test_the_budgets_of_old_deaths_are_forgotten():
    """Only the latest deaths are kept, so the budgets take bounded memory."""
    budgets = DeathBudgets(per_death=1, remembered=2)
    assert [budgets.take("a"), budgets.take("a"), budgets.take("b"), budgets.take("c")] == [
        True,
        False,
        True,
        True,
    ]
    assert budgets.take("a")  # forgotten: a fresh budget


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


def test_a_body_declared_over_the_cap_streams_through_and_is_not_retried(monkeypatch):
    """A body whose Content-Length passes the buffer cap is not kept: one try, and its lost replica is left
    to the proxy (no retry, no 503 of ours)."""
    monkeypatch.setenv("RERANK_PROXY_BUFFER_BYTES", "10")
    proxy = FakeProxy(died(), 200)
    assert call(ReplicaLossRetry(proxy), headers=[(b"content-length", str(len(BODY)).encode())]) == []
    assert proxy.bodies == [BODY]


def test_a_chunked_body_past_the_cap_streams_through_and_is_not_retried(monkeypatch):
    """No Content-Length: the chunks read before the cap are replayed, the rest streams; no retry."""
    monkeypatch.setenv("RERANK_PROXY_BUFFER_BYTES", "20")
    proxy = FakeProxy(died(), 200)
    middleware = ReplicaLossRetry(proxy)
    assert call(middleware, chunks=4) == []
    assert proxy.bodies == [BODY]
    assert proxy.message_sizes == [[10, 10, 10, 9]]  # as the client sent them, never joined
    assert middleware.pool.used == 0


def test_a_chunked_48_mib_upload_is_streamed_never_held_whole():
    """48 MiB in 64 KiB chunks, no Content-Length: the app gets it chunk by chunk, the middleware keeps
    at most its 1 MiB cap meanwhile, and gives it all back at the end."""
    chunk, count = b"x" * (64 * 1024), 48 * 16
    held: list[int] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        sizes, more_body = [], True
        while more_body:
            message = await receive()
            sizes.append(len(message["body"]))
            more_body = message.get("more_body", False)
            held.append(middleware.pool.used)
        assert (sum(sizes), max(sizes)) == (48 * MIB, len(chunk))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    middleware = ReplicaLossRetry(app)
    incoming = iter(range(count))

    async def receive() -> dict:
        number = next(incoming, None)
        if number is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": number < count - 1}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(
        middleware({"type": "http", "method": "POST", "path": "/v1/rerank", "headers": []}, receive, send)
    )
    assert sent[0]["status"] == 200
    assert max(held) <= MIB
    assert middleware.pool.used == 0


def test_all_requests_together_keep_at_most_the_total_cap(monkeypatch):
    """While one request holds its kept body, another's is kept only up to what is left of the total;
    past it, it streams. Both get their answers, and the pool is empty afterwards."""
    monkeypatch.setenv("RERANK_PROXY_BUFFER_TOTAL_BYTES", "4000")
    body = b"x" * 3000
    sizes: dict[str, list[int]] = {}
    held: list[int] = []

    async def main() -> list[list[dict]]:
        first_in, second_done = asyncio.Event(), asyncio.Event()

        async def app(scope: dict, receive: Any, send: Any) -> None:
            seen, more_body = [], True
            while more_body:
                message = await receive()
                seen.append(len(message["body"]))
                more_body = message.get("more_body", False)
            sizes[scope["path"]] = seen
            held.append(middleware.pool.used)
            if scope["path"] == "/a/v1/rerank":
                first_in.set()
                await second_done.wait()
            else:
                second_done.set()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}", "more_body": False})

        middleware = ReplicaLossRetry(app)

        async def second() -> list[dict]:
            await first_in.wait()
            return await request(middleware, body, 3, path="/b/v1/rerank")

        results = await asyncio.gather(request(middleware, body, 3, path="/a/v1/rerank"), second())
        assert middleware.pool.used == 0
        return list(results)

    sent = asyncio.run(main())
    assert [messages[0]["status"] for messages in sent] == [200, 200]
    assert sizes == {"/a/v1/rerank": [3000], "/b/v1/rerank": [1000, 1000, 1000]}
    assert max(held) <= 4000


def test_the_buffer_caps_come_from_the_env_and_never_pass_max_body_bytes():
    """``RERANK_PROXY_BUFFER_BYTES`` (1 MiB) is capped by ``RERANK_MAX_BODY_BYTES`` where that is set."""
    assert ProxyConfig.from_env({}) == ProxyConfig(MIB, 64 * MIB, frozenset({"rerank"}))
    environ = {
        "RERANK_PROXY_BUFFER_BYTES": "5000000",
        "RERANK_MAX_BODY_BYTES": "2000000",
        "RERANK_PROXY_BUFFER_TOTAL_BYTES": "9000000",
        "RERANK_PROXY_APPS": " rerank ,cascade,",
    }
    assert ProxyConfig.from_env(environ) == ProxyConfig(
        2_000_000, 9_000_000, frozenset({"rerank", "cascade"})
    )
    assert ProxyConfig.from_env({"RERANK_MAX_BODY_BYTES": "4096"}).buffer_bytes == 4096


def test_a_malformed_env_value_keeps_the_default_and_says_so(proxy_log):
    """The middleware is built in the node's shared proxy: a bad value must not take HTTP down for every
    app on the node, so it is logged and the default kept."""
    assert ProxyConfig.from_env({"RERANK_PROXY_BUFFER_BYTES": "1MiB"}).buffer_bytes == MIB
    assert any("RERANK_PROXY_BUFFER_BYTES='1MiB' is not a whole number" in line for line in proxy_log)


def test_the_service_knows_the_proxys_variables():
    """The replicas' unknown-variable warning leaves the proxy's own RERANK_* variables alone."""
    from serve.settings import ServeSettings

    names = {"RERANK_PROXY_BUFFER_BYTES", "RERANK_PROXY_BUFFER_TOTAL_BYTES", "RERANK_PROXY_APPS"}
    assert names <= ServeSettings.env_names()


def test_without_serves_status_function_nothing_is_retried(monkeypatch, serve_proxy_module, proxy_log):
    """Another Ray version without the wrapped function: one warning, and every request passes through."""
    monkeypatch.delattr(serve_proxy_module, "get_http_response_status")
    proxy = FakeProxy(died(), 200, 200)
    middleware = ReplicaLossRetry(proxy)
    assert [line for line in proxy_log if "retries no request" in line]
    assert call(middleware) == []
    assert call(middleware)[0]["status"] == 200
    assert len(proxy.bodies) == 2


def test_the_status_function_is_wrapped_once_and_still_answers(serve_proxy_module):
    """Installing twice wraps once; the wrapped function returns what Serve's own does."""
    original = serve_proxy_module.get_http_response_status
    assert install_status_probe() and install_status_probe()
    wrapped = serve_proxy_module.get_http_response_status
    assert wrapped.__wrapped__ is original
    assert wrapped(died(), None, "id").code == original(died(), None, "id").code == 500


def test_each_retry_and_each_refusal_is_one_log_line(proxy_log):
    """The reason is in the proxy's log: a retry, a 503, a try left to the proxy."""
    proxy = FakeProxy(died(actor=1), 200, died(actor=1), died(actor=2), user_exception())
    middleware = ReplicaLossRetry(proxy)
    call(middleware), call(middleware), call(middleware)
    lines = [line for line in proxy_log if line.startswith("POST /v1/rerank")]
    assert len(lines) == 4
    assert "request lost its replica (try 1 of 2); retrying: replica" in lines[0]
    assert "answering 503: no retry left after try 2 of 2 (replica" in lines[2]
    assert "not retried: a user exception" in lines[3]


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
