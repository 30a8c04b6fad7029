"""The deployment itself on a real (local) Ray Serve: replica start-up, ingress, auth and user_config.

Route behaviour is tested in-process (tests/unit/test_api.py); these few tests cover what only a
running Serve shows.
"""

import socket

import numpy as np
import pytest
import requests

from reranker.model import sigmoid

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

QUERY = "how do solar panels work"
DOCS = ["solar panels convert sunlight", "bananas are yellow", "the sun makes energy", "python language"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """Serve on 127.0.0.1: the shipped builder with an API key, and a user_config, as a config file does."""
    from ray import serve

    from reranker.settings import ServeSettings
    from serve.app import Reranker

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings.load(file_values={"model": str(tiny_model_dir), "api_key": "sekret"})
    deployment = Reranker.options(
        ray_actor_options={"num_cpus": 0.1}, user_config={"max_batch_pairs": 2, "batch_wait_timeout_s": 0.01}
    )
    serve.run(deployment.bind(settings), name="rerank", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url, path, body, key="sekret"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url + path, json=body, headers=headers, timeout=30)


def test_replica_serves_rerank_and_score(server, tiny_model):
    """Through Serve's proxy: Cohere, TEI and /score answers equal in-process scoring."""
    expected = tiny_model.score([QUERY] * 4, DOCS).scores
    results = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()["results"]
    assert [r["index"] for r in results] == np.argsort(-expected, kind="stable").tolist()
    assert results[0]["relevance_score"] == pytest.approx(float(sigmoid(expected).max()), abs=1e-5)
    tei = post(server, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    assert tei[0]["score"] == pytest.approx(float(expected.max()), abs=1e-5)
    scores = post(server, "/score", {"pairs": [[QUERY, d] for d in DOCS]}).json()["scores"]
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_api_key_and_open_health_through_serve(server):
    """The replica's API key holds behind Serve's proxy; /health stays open."""
    body = {"query": QUERY, "documents": DOCS}
    assert post(server, "/v1/rerank", body, key=None).status_code == 401
    assert post(server, "/v1/rerank", body, key="wrong").json()["error"]["type"] == "authentication_error"
    assert requests.get(server + "/health", timeout=10).json() == {"status": "ok"}


def test_user_config_reached_the_replica(server):
    """A user_config of max_batch_pairs 2 still answers requests larger than a batch, in order."""
    documents = DOCS * 5
    response = post(server, "/score", {"pairs": [[QUERY, d] for d in documents]})
    assert response.status_code == 200 and len(response.json()["scores"]) == 20
    assert response.json()["scores"][:4] == pytest.approx(response.json()["scores"][4:8], abs=1e-6)
