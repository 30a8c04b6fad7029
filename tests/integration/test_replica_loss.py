"""A replica that dies with a request in flight, behind Serve's real proxy with the shipped middleware.

Only a scoring request of this project's app (``rerank``) whose replica process died is retried; another
app's dead replica and a replica's own exception keep the proxy's bare 500.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.serve_helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

BODY = {"query": "q", "documents": ["a", "b"]}


@contextmanager
def serving() -> Iterator[int]:
    """Serve on a free port of 127.0.0.1, shut down afterwards; the port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


def dies_once_deployment(marker: Path, die_on: tuple[int, ...] = (1,)):  # type: ignore[no-untyped-def]
    """A one-replica echo deployment, on any path, whose replica kills its own process on the first call
    (or on each call numbered in ``die_on``)."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, health_check_period_s=1)
    class DiesOnce:
        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            with marker.open("a") as calls:
                calls.write(f"{os.getpid()}\n")
            if len(marker.read_text().splitlines()) in die_on:
                os._exit(1)  # as a SIGKILL or the OOM killer would: no answer, the actor is gone
            return {"echo": body, "pid": os.getpid()}

    return DiesOnce.bind()


def raises_deployment(marker: Path):  # type: ignore[no-untyped-def]
    """A one-replica deployment whose ASGI app raises before it starts a response (its process lives on).

    A raw ASGI app, as a FastAPI app or a plain ``__call__`` would have a 500 sent before the exception.
    """
    from ray import serve

    def build_app():  # type: ignore[no-untyped-def]
        async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
            if scope["type"] == "lifespan":
                while (message := await receive())["type"] != "lifespan.shutdown":
                    await send({"type": f"{message['type']}.complete"})
                await send({"type": "lifespan.shutdown.complete"})
                return
            with marker.open("a") as calls:
                calls.write(f"{os.getpid()}\n")
            raise ValueError("a bug in the replica's code")

        return app

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(build_app)
    class Raises:
        pass

    return Raises.bind()


def calls(marker: Path) -> list[int]:
    """The pids of the replicas that took a call, in order."""
    return [int(pid) for pid in marker.read_text().splitlines()]


def proxy_log_has(text: str, timeout_s: float = 10.0) -> bool:
    """Whether a Serve proxy log of this Ray session has a line containing ``text`` (it may lag a little)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(text in path.read_text(errors="replace") for path in logs.glob("proxy_*.log")):
            return True
        time.sleep(0.2)
    return False


def test_a_scoring_request_whose_replica_died_is_answered_by_the_replacement(tmp_path):
    """Serve's proxy alone answers a bare 500; with serve.proxy's middleware the request to the ``rerank``
    app is sent again and the replacement replica answers it, with the same body."""
    from ray import serve

    marker = tmp_path / "calls"
    with serving() as port:
        serve.run(dies_once_deployment(marker, die_on=(1, 3)), name="rerank", route_prefix="/")
        response = requests.post(f"http://127.0.0.1:{port}/v1/rerank", json=BODY, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["echo"] == BODY
        first, second = calls(marker)
        assert response.json()["pid"] == second != first
        # A chunked body past the proxy's 1 MiB retry buffer streams to the replica unbuffered (it is never
        # held whole in the shared proxy) and is not retried when that replica dies: the proxy's own 500.
        big = json.dumps({"query": "q", "documents": ["x" * 1000] * 2100}).encode()  # ~2 MiB
        chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: chunked
        response = requests.post(f"http://127.0.0.1:{port}/v1/rerank", data=chunks, timeout=60)
        assert response.status_code == 500 and len(calls(marker)) == 3
        assert proxy_log_has("not retried: its body streamed past the buffer cap")


def test_a_dead_replica_of_another_app_is_left_to_the_proxy(tmp_path):
    """The same death in an app that is not this project's: not retried, the proxy's own 500."""
    from ray import serve

    marker = tmp_path / "calls"
    with serving() as port:
        serve.run(dies_once_deployment(marker), name="other", route_prefix="/")
        response = requests.post(f"http://127.0.0.1:{port}/v1/rerank", json=BODY, timeout=60)
        assert response.status_code == 500, response.text
        assert "replica_unavailable" not in response.text
        assert len(calls(marker)) == 1
        assert proxy_log_has("not retried: the dead replica is of app 'other'")


def test_a_replica_that_raises_is_not_retried(tmp_path):
    """A replica of the ``rerank`` app whose code raises before answering (the proxy gets a RayTaskError
    and no response) gets one call: the proxy's own 500."""
    from ray import serve

    marker = tmp_path / "calls"
    with serving() as port:
        serve.run(raises_deployment(marker), name="rerank", route_prefix="/")
        response = requests.post(f"http://127.0.0.1:{port}/v1/rerank", json=BODY, timeout=60)
        assert response.status_code == 500, response.text
        assert "replica_unavailable" not in response.text
        assert len(calls(marker)) == 1
        assert proxy_log_has("/v1/rerank lost its try with no response; not retried: a user exception")


def test_a_cascade_stage_replica_that_dies_mid_request_is_retried_on_its_handle(
    tmp_path, tiny_model_dir, larger_model_dir, tiny_model, larger_model
):
    """deployment_per_stage: stage 1's only replica dies inside a request; the ingress sends the call again
    through the stage's handle (to its replacement) and answers 200 with the cascade's order, not a 500."""
    import numpy as np
    from ray import serve

    from serve.app import Reranker, RerankStage
    from serve.settings import ServeSettings
    from serve.shape import app_shape

    marker = tmp_path / "died"

    class DiesOnceStage(RerankStage.func_or_class):  # type: ignore[name-defined,misc]
        async def score(self, queries, passages, truncation, instruction=None):  # type: ignore[no-untyped-def]
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return await super().score(queries, passages, truncation, instruction)

    args = {
        "cascade": [{"model": str(tiny_model_dir), "rerank_count": 2}, {"model": str(larger_model_dir)}],
        "cascade_layout": "deployment_per_stage",
    }
    shape = app_shape(ServeSettings.load(file_values=args))
    small = {"num_cpus": 0.1}
    stages = [
        RerankStage.options(func_or_class=DiesOnceStage, name="RerankStage_stage1", ray_actor_options=small),
        RerankStage.options(name="RerankStage_stage2", ray_actor_options=small),
    ]
    handles = [stage.bind(args, number, shape) for number, stage in enumerate(stages)]
    documents = ["solar panels convert sunlight", "bananas are yellow", "the sun makes energy", "python"]
    with serving() as port:
        serve.run(Reranker.options(ray_actor_options=small).bind(args, handles, shape), name="rerank")
        body = {"query": "how do solar panels work", "documents": documents}
        response = requests.post(f"http://127.0.0.1:{port}/v1/rerank", json=body, timeout=120)
    assert marker.exists(), "the stage replica did not die"
    assert response.status_code == 200, response.text
    first = tiny_model.score([body["query"]] * 4, documents).scores
    second = larger_model.score([body["query"]] * 4, documents).scores
    by_first = [int(i) for i in np.argsort(-first, kind="stable")]
    expected = sorted(by_first[:2], key=lambda i: -second[i]) + by_first[2:]
    assert [result["index"] for result in response.json()["results"]] == expected
