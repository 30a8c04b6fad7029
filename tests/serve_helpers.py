"""Helpers for testing the service without a running Serve: an app over the tiny model, in-process."""

from __future__ import annotations

import socket
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve.api import create_api
from serve.core import RerankService
from serve.engine import RerankEngine
from serve.settings import ServeSettings
from serve.shape import batching_config

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RecordingMetric:
    """Stands in for a Ray counter or histogram; keeps what it was given."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.tags: list[dict[str, str]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.values.append(value)
        self.tags.append(tags or {})

    observe = set = inc


class RecordingMetrics:
    """Every metric of ``serve.metrics.RerankMetrics``, recorded in memory."""

    def __init__(self) -> None:
        self._metrics: dict[str, RecordingMetric] = defaultdict(RecordingMetric)

    def __getattr__(self, name: str) -> RecordingMetric:
        return self._metrics[name]


def make_app(model: Any, **settings: Any) -> FastAPI:
    """A fresh app whose service scores with ``model`` (a loaded CrossEncoderModel), or with a cascade
    of loaded models (a list; pass ``rerank_count``, the k of each stage but the last)."""
    models = model if isinstance(model, list) else [model]
    counts = settings.pop("rerank_count", None)
    if len(models) > 1:
        counts = counts if isinstance(counts, list) else [counts] * (len(models) - 1)
        settings["cascade"] = [
            {"model": each.name, **({"rerank_count": k} if k else {})}
            for each, k in zip(models, [*counts, None], strict=True)
        ]
    serve_settings = ServeSettings.load(model=models[0].name, **settings)
    metrics = RecordingMetrics()
    names = [f"stage{number}" for number in range(1, len(models) + 1)]
    engines = [
        RerankEngine(each, batching_config(serve_settings), metrics, stage=name)  # type: ignore[arg-type]
        for each, name in zip(models, names, strict=True)
    ]
    app = create_api()
    app.state.service = RerankService(serve_settings, engines, metrics)  # type: ignore[arg-type]
    return app


@contextmanager
def serving(model: Any, **settings: Any) -> Iterator[TestClient]:
    """A test client over a fresh app; the app's engine lives on the client's one event loop."""
    with TestClient(make_app(model, **settings), base_url="http://rerank.test") as client:
        yield client


def in_app_loop(client: TestClient, work: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
    """Run ``work(async_client)`` on the app's event loop, e.g. to send requests concurrently."""

    async def main() -> T:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rerank.test") as async_client:
            return await work(async_client)

    assert client.portal is not None
    return client.portal.call(main)


class InstrumentedModel:
    """A loaded model whose ``tokenize`` and ``score`` (every engine batch and health probe) run a hook.

    The hook sees each call's queries and passages before the real model does: it can block (to hold a
    batch while others queue), raise (a request the model fails on), or just count.
    """

    def __init__(self, model: Any, hook: Callable[[list[str], list[str]], None] | None = None) -> None:
        self._model = model
        self.hook = hook
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def tokenize(self, queries: Any, passages: Any, *args: Any, **kwargs: Any) -> Any:
        self._before("tokenize", list(queries), list(passages))
        return self._model.tokenize(queries, passages, *args, **kwargs)

    def score(self, queries: Any, passages: Any, *args: Any, **kwargs: Any) -> Any:
        self._before("score", list(queries), list(passages))
        return self._model.score(queries, passages, *args, **kwargs)

    def _before(self, method: str, queries: list[str], passages: list[str]) -> None:
        self.calls.append((method, len(passages)))
        if self.hook is not None:
            self.hook(queries, passages)
