"""A Serve config's user_config on a running app, deployed the way `serve deploy` does (the config's
import path and args: a change to user_config alone reconfigures the running replicas in place)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.serve_helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]
BODY = {"query": "how do solar panels work", "documents": ["solar panels convert sunlight", "bananas"]}


def deploy_config(model_dir: Any, user_config: dict[str, Any]) -> None:
    """Deploy the shipped app from a config (as `serve deploy` does) with this user_config."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    application = {
        "name": "rerank",
        "route_prefix": "/",
        "import_path": "serve.app:build_app",
        "args": {"model": str(model_dir)},
        "deployments": [
            {
                "name": "Reranker",
                "num_replicas": 1,
                "ray_actor_options": {"num_cpus": 0.1},
                "user_config": user_config,
            }
        ],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [application]}))


def wait_for(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def answered(url: str) -> dict[str, Any] | None:
    try:
        response = requests.get(url + "/health", timeout=5)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


@pytest.fixture
def served(tiny_model_dir) -> Iterator[str]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        deploy_config(tiny_model_dir, {"max_batch_pairs": 8})
        wait_for(lambda: answered(url) is not None)
        yield url
    finally:
        serve.shutdown()


def test_a_bad_user_config_is_refused_and_the_replica_keeps_serving(served, tiny_model_dir):
    """A user_config every replica must refuse (Ray stops a replica whose reconfigure raises, and its
    replacements fail the same way: an outage): the running replica keeps its batching and answers,
    /health names the refusal, and a good user_config clears it, all without a restart."""
    from ray import serve

    before = serve.get_deployment_handle("Reranker", app_name="rerank").batching.remote().result()
    assert before["max_batch_pairs"] == 8
    deploy_config(tiny_model_dir, {"max_batch_pairs": 0, "batch_wait_timeout_s": 0.5})
    wait_for(lambda: bool((answered(served) or {}).get("config_refused")))
    refused = answered(served)["config_refused"]["stage1"]  # type: ignore[index]
    assert "max_batch_pairs" in refused
    after = serve.get_deployment_handle("Reranker", app_name="rerank").batching.remote().result()
    assert after == before  # the same replica (a new one would have the settings' 1024), nothing changed
    assert requests.post(served + "/v1/rerank", json=BODY, timeout=30).status_code == 200
    deploy_config(tiny_model_dir, {"max_batch_pairs": 4})
    wait_for(lambda: answered(served) == {"status": "ok"})
    handle = serve.get_deployment_handle("Reranker", app_name="rerank")
    assert handle.batching.remote().result()["max_batch_pairs"] == 4
