import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

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
    """Serve on 127.0.0.1 with three apps: open (/), API-key protected (/secure), tiny queue (/tight)."""
    from ray import serve

    from reranker.settings import ServeSettings
    from serve.app import Reranker

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    limits = {"max_documents": 50, "max_document_chars": 2000, "max_body_bytes": 64 * 1024}
    apps = {
        "/": ({**limits}, {"batch_wait_timeout_s": 0.05}),
        "/secure": ({"api_key": "sekret"}, {}),
        "/tight": ({}, {"max_pending_pairs": 10, "batch_wait_timeout_s": 0.5}),
    }
    for prefix, (settings, user_config) in apps.items():
        name = prefix.strip("/") or "main"
        deployment = Reranker.options(
            name=f"Reranker-{name}", ray_actor_options={"num_cpus": 0.1}, user_config=user_config or None
        )
        app = deployment.bind(ServeSettings.load(model=str(tiny_model_dir), **settings))
        serve.run(app, name=name, route_prefix=prefix)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url, path, body, **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(
        url + path,
        data=data,
        headers={"Content-Type": "application/json", **kwargs.pop("headers", {})},
        timeout=30,
        **kwargs,
    )


def assert_error(response, status, error_type, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and set(error) == {"type", "message"}
    for word in words:
        assert word in error["message"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_cohere_style_rerank_sorted_with_documents(server, tiny_model, path):
    """Cohere/Jina/vLLM shape: sigmoid relevance, best first, top_n, documents echoed."""
    documents = [DOCS[0], {"text": DOCS[1]}, DOCS[2], DOCS[3]]
    body = {"query": QUERY, "documents": documents, "top_n": 3, "return_documents": True}
    response = post(server, path, body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"id", "model", "results", "usage", "meta"}
    expected = sigmoid(tiny_model.score([QUERY] * 4, DOCS).scores)
    results = payload["results"]
    assert [r["index"] for r in results] == np.argsort(-expected, kind="stable")[:3].tolist()
    for result in results:
        assert result["relevance_score"] == pytest.approx(float(expected[result["index"]]), abs=1e-5)
        assert result["document"] == {"text": DOCS[result["index"]]}
    assert payload["usage"]["total_tokens"] > 0


def test_documents_are_left_out_unless_asked(server):
    """return_documents defaults to false."""
    results = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()["results"]
    assert len(results) == 4 and all(r.get("document") is None for r in results)


def test_tei_rerank_bare_sorted_array(server, tiny_model):
    """TEI shape: a bare array sorted by score; raw_scores gives logits, else sigmoid."""
    raw = post(
        server, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True}
    ).json()
    logits = tiny_model.score([QUERY] * 4, DOCS).scores
    assert [r["index"] for r in raw] == np.argsort(-logits, kind="stable").tolist()
    assert raw[0]["score"] == pytest.approx(float(logits[raw[0]["index"]]), abs=1e-5)
    assert raw[0]["text"] == DOCS[raw[0]["index"]]
    probs = post(server, "/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert probs[0]["score"] == pytest.approx(float(sigmoid(logits)[probs[0]["index"]]), abs=1e-5)
    assert "text" not in probs[0] or probs[0]["text"] is None


def test_tei_truncation_options(server):
    """truncate=false rejects over-long input (413); Left truncation is accepted."""
    long_text = "solar " * 200
    assert_error(
        post(server, "/rerank", {"query": QUERY, "texts": [long_text], "truncate": False}),
        413,
        "payload_too_large",
        "truncate",
    )
    left = post(
        server, "/rerank", {"query": QUERY, "texts": [long_text + "end"], "truncation_direction": "Left"}
    )
    right = post(server, "/rerank", {"query": QUERY, "texts": [long_text + "end"]})
    assert left.status_code == right.status_code == 200


def test_score_pairs_in_input_order_matches_offline_model(server, tiny_model):
    """/score returns raw logits in input order: the job's scores for the same pairs."""
    pairs = [[QUERY, d] for d in DOCS]
    payload = post(server, "/score", {"pairs": pairs}).json()
    np.testing.assert_allclose(payload["scores"], tiny_model.score([QUERY] * 4, DOCS).scores, atol=1e-5)


def test_health_models_and_docs(server, tiny_model_dir):
    """/health, /v1/models (OpenAI list) and the OpenAPI docs are served."""
    assert requests.get(server + "/health", timeout=10).json() == {"status": "ok"}
    models = requests.get(server + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == str(tiny_model_dir)
    assert requests.get(server + "/docs", timeout=10).status_code == 200
    paths = requests.get(server + "/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/rerank", "/v2/rerank", "/rerank", "/score", "/health", "/v1/models"} <= set(paths)


@pytest.mark.parametrize(
    ("body", "status", "error_type", "words"),
    [
        ({"query": QUERY, "documents": ["d"] * 51}, 422, "validation_error", ("documents", "limit is 50")),
        (
            {"query": QUERY, "documents": ["x" * 2001]},
            422,
            "validation_error",
            ("documents", "2001 characters"),
        ),
        ({"query": QUERY, "documents": DOCS, "top_n": 0}, 422, "validation_error", ("top_n",)),
        ({"query": QUERY, "documents": []}, 422, "validation_error", ("documents", "empty")),
        ({"query": QUERY, "documents": "not a list"}, 422, "validation_error", ("documents",)),
        ({"query": QUERY, "documents": [1, 2]}, 422, "validation_error", ("documents",)),
        ({"documents": DOCS}, 422, "validation_error", ("query",)),
        ({"query": "", "documents": DOCS}, 422, "validation_error", ("query",)),
        ({"query": QUERY, "documents": DOCS, "model": "other-model"}, 404, "model_not_found", ("model",)),
        (b"{not json", 400, "invalid_request_error", ("JSON",)),
        (b"[1, 2]", 400, "invalid_request_error", ("object",)),
        (json.dumps({"query": QUERY, "documents": ["y" * 1000] * 70}), 413, "payload_too_large", ("bytes",)),
    ],
    ids=[
        "too-many",
        "too-long",
        "top_n",
        "empty",
        "docs-type",
        "doc-item-type",
        "no-query",
        "empty-query",
        "unknown-model",
        "invalid-json",
        "not-object",
        "body-too-large",
    ],
)
def test_bad_input_gets_4xx_naming_the_field(server, body, status, error_type, words):
    """Every bad input is a 4xx in the one error shape; the server keeps serving."""
    assert_error(post(server, "/v1/rerank", body), status, error_type, *words)
    assert post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200


def test_unknown_route_uses_the_error_shape(server):
    """Even a 404 route answer has the one error shape."""
    assert_error(requests.get(server + "/nope", timeout=10), 404, "http_error")


def test_api_key_required_when_configured(server):
    """With RERANK_API_KEY set, requests need 'Authorization: Bearer <key>'; /health stays open."""
    body = {"query": QUERY, "documents": DOCS}
    assert_error(post(server, "/secure/v1/rerank", body), 401, "authentication_error")
    assert_error(
        post(server, "/secure/v1/rerank", body, headers={"Authorization": "Bearer wrong"}),
        401,
        "authentication_error",
    )
    assert (
        post(server, "/secure/v1/rerank", body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    )
    assert requests.get(server + "/secure/health", timeout=10).status_code == 200


def test_overload_answers_503_with_retry_after(server):
    """Past the replica's queue bound, requests get 503 + Retry-After; the server recovers."""
    body = {"query": QUERY, "documents": ["solar"] * 10}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(server, "/tight/v1/rerank", body), range(8)))
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 503 in statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["Retry-After"] == "1"
    assert_error(rejected, 503, "overloaded")
    assert post(server, "/tight/v1/rerank", body).status_code == 200


def test_concurrent_requests_share_a_model_batch(server):
    """Pairs from several concurrent requests are scored in one model batch."""
    barrier = threading.Barrier(6)

    def call(i):
        barrier.wait()
        return post(server, "/v1/rerank", {"query": f"{QUERY} {i}", "documents": DOCS}).json()

    with ThreadPoolExecutor(6) as pool:
        metas = [payload["meta"]["batch"] for payload in pool.map(call, range(6))]
    assert max(meta["requests"] for meta in metas) >= 2
    assert max(meta["pairs"] for meta in metas) >= 2 * len(DOCS)
