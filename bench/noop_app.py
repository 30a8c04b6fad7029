"""A no-op Serve deployment for ``bench/serve_load.py``: Serve's own cost per request, no model.

It reads the body of ``POST /v1/rerank`` and answers a fixed, empty result, so the proxy, routing,
replica and ASGI hops are all that is timed. ``serve run bench.noop_app:app``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from ray import serve

api = FastAPI()


@api.get("/health")
async def health() -> dict[str, str]:
    """Always ready."""
    return {"status": "ok"}


@api.post("/v1/rerank")
async def rerank(request: Request) -> dict[str, list[object]]:
    """Read the body, score nothing."""
    await request.body()
    return {"results": []}


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 2})
@serve.ingress(api)
class NoOp:
    """The routes above as one replica, sized like the shipped Reranker."""


app = NoOp.bind()  # type: ignore[attr-defined]
