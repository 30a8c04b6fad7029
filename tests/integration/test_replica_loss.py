"""A replica that dies with a request in flight, behind Serve's real proxy with the shipped middleware."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from tests.serve_helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def dies_once_deployment(marker: Path):  # type: ignore[no-untyped-def]
    """A one-replica echo deployment whose replica kills its own process on the first request."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, health_check_period_s=1)
    class DiesOnce:
        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # as a SIGKILL or the OOM killer would: no answer, the actor is gone
            return {"echo": body, "pid": os.getpid()}

    return DiesOnce.bind()


def test_a_request_whose_replica_died_is_answered_by_the_replacement(tmp_path):
    """Serve's proxy alone answers a bare 500; with serve.proxy's middleware the request is sent again
    and the replacement replica answers it, with the same body."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        marker = tmp_path / "died"
        serve.run(dies_once_deployment(marker), name="dies-once", route_prefix="/dies-once")
        body = {"query": "q", "documents": ["a", "b"]}
        response = requests.post(f"http://127.0.0.1:{port}/dies-once", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["echo"] == body
        assert response.json()["pid"] != int(marker.read_text())
    finally:
        serve.shutdown()
