"""Each API dialect in-process (no Serve): its fields, defaults and shape, its scores equal the model's."""

import re

import numpy as np
import pytest

from reranker.model import sigmoid
from serve.dialects import all_dialects
from serve.proxy import SCORING_ROUTES
from tests.serve_helpers import serving

pytestmark = pytest.mark.unit

QUERY = "how do solar panels work"
DOCS = ["solar panels convert sunlight", "bananas are yellow", "the sun makes energy", "python language"]
LONG = "solar panels convert sunlight into electricity " * 40  # far past the tiny model's 64 tokens


@pytest.fixture(scope="module")
def app(tiny_model):
    with serving(tiny_model) as client:
        yield client


def logits(model, documents, query=QUERY):
    return model.score([query] * len(documents), list(documents)).scores


def best_first(scores):
    return np.argsort(-scores, kind="stable").tolist()


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_voyage_top_k_documents_as_strings_and_data(app, tiny_model, path):
    """Voyage's body (top_k, truncation): its answer has data, the documents as plain strings."""
    body = {"query": QUERY, "documents": DOCS, "model": tiny_model.name, "top_k": 2, "return_documents": True,
            "truncation": True}  # fmt: skip
    payload = app.post(path, json=body).json()
    assert set(payload) == {"object", "data", "model", "usage"} and payload["object"] == "list"
    expected = sigmoid(logits(tiny_model, DOCS))
    assert [item["index"] for item in payload["data"]] == best_first(expected)[:2]
    for item in payload["data"]:
        assert item["relevance_score"] == pytest.approx(float(expected[item["index"]]), abs=1e-6)
        assert item["document"] == DOCS[item["index"]]
    assert payload["usage"]["total_tokens"] == payload["usage"]["prompt_tokens"] > 0
    everything = app.post(path, json={"query": QUERY, "documents": DOCS, "top_k": None, "truncation": True})
    assert len(everything.json()["data"]) == 4


def test_a_cohere_body_with_a_boolean_truncation_stays_cohere(app):
    """top_n says Cohere: its answer (results) and its top_n, whatever else the body carries."""
    body = {"query": QUERY, "documents": DOCS, "top_n": 1, "truncation": True}
    assert len(app.post("/v1/rerank", json=body).json()["results"]) == 1


def test_voyage_truncation_false_refuses_what_does_not_fit(app):
    body = {"query": QUERY, "documents": [LONG, DOCS[0]], "truncation": False}
    assert "truncation is false" in error_of(app.post("/v1/rerank", json=body), 413)
    assert app.post("/v1/rerank", json={**body, "truncation": True}).status_code == 200


def test_nim_ranking_raw_logits_best_first(app, tiny_model):
    """NIM's /v1/ranking: every passage, raw logits, best first; truncate NONE (its default) refuses."""
    body = {"model": tiny_model.name, "query": {"text": QUERY}, "passages": [{"text": doc} for doc in DOCS],
            "truncate": "END"}  # fmt: skip
    rankings = app.post("/v1/ranking", json=body).json()["rankings"]
    expected = logits(tiny_model, DOCS)
    assert [item["index"] for item in rankings] == best_first(expected)
    np.testing.assert_allclose(
        [item["logit"] for item in rankings], expected[best_first(expected)], atol=1e-5
    )
    long = {"query": {"text": QUERY}, "passages": [{"text": LONG}]}
    assert 'truncate is "NONE"' in error_of(app.post("/v1/ranking", json=long), 413)
    cut = app.post("/v1/ranking", json={**long, "truncate": "END"}).json()["rankings"][0]["logit"]
    assert cut == pytest.approx(float(logits(tiny_model, [LONG])[0]), abs=1e-5)
    assert "passages" in error_of(
        app.post("/v1/ranking", json={"query": {"text": QUERY}, "passages": []}), 422
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2")],
)
@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_vllm_score_shapes_one_to_many_and_pairwise(app, tiny_model, path, first, second):
    """Every vLLM score shape, one query against many and N against N: data in pair order, sigmoid."""
    payload = app.post(path, json={first: QUERY, second: DOCS}).json()
    assert payload["object"] == "list" and [item["index"] for item in payload["data"]] == [0, 1, 2, 3]
    expected = sigmoid(logits(tiny_model, DOCS))
    np.testing.assert_allclose([item["score"] for item in payload["data"]], expected, atol=1e-6)
    queries = [QUERY, "bananas", QUERY, "python"]
    pairwise = app.post(path, json={first: queries, second: DOCS, "use_activation": False}).json()
    raw = tiny_model.score(queries, DOCS).scores
    np.testing.assert_allclose([item["score"] for item in pairwise["data"]], raw, atol=1e-5)


def test_vllm_score_refusals_and_our_pairs_beside_it(app, tiny_model):
    """Unequal sides or no sides are 422; a body with pairs is still ours (raw logits, scores)."""
    assert "one per text" in error_of(
        app.post("/score", json={"queries": ["a", "b"], "documents": DOCS}), 422
    )
    assert "queries/documents" in error_of(app.post("/score", json={"queries": QUERY}), 422)
    ours = app.post("/score", json={"pairs": [[QUERY, doc] for doc in DOCS]}).json()
    np.testing.assert_allclose(ours["scores"], logits(tiny_model, DOCS), atol=1e-5)


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_rank_fields_score_the_named_fields(app, tiny_model, path):
    """Cohere v1 object documents: rank_fields picks what is scored (one field: its value; several:
    "field: value" lines in their order); without it, text."""
    documents = [{"title": "Solar power", "text": doc, "id": i} for i, doc in enumerate(DOCS)]

    def scores(**extra):
        results = app.post(path, json={"query": QUERY, "documents": documents, **extra}).json()["results"]
        return np.array([score for _, score in sorted((r["index"], r["relevance_score"]) for r in results)])

    both = [f"title: Solar power\ntext: {doc}" for doc in DOCS]
    np.testing.assert_allclose(
        scores(rank_fields=["title", "text"]), sigmoid(logits(tiny_model, both)), atol=1e-6
    )
    np.testing.assert_allclose(scores(), sigmoid(logits(tiny_model, DOCS)), atol=1e-6)
    titles = scores(rank_fields=["title"])
    np.testing.assert_allclose(titles, sigmoid(logits(tiny_model, ["Solar power"] * 4)), atol=1e-6)
    missing = app.post(path, json={"query": QUERY, "documents": documents, "rank_fields": ["author"]})
    assert "none of the fields" in error_of(missing, 422)


@pytest.mark.parametrize("top_n", [0, None])
def test_top_n_zero_or_null_returns_every_document(app, top_n):
    """vLLM's convention: top_n 0 (its default) means all."""
    results = app.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": top_n}).json()[
        "results"
    ]
    assert len(results) == 4


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_max_tokens_per_query_cuts_the_query(app, tiny_model, path):
    """max_tokens_per_query scores the query cut to that many of its own tokens (whole words: the tiny
    vocabulary makes "how do" three)."""
    body = {"query": QUERY, "documents": DOCS, "max_tokens_per_query": 3}
    results = app.post(path, json=body).json()["results"]
    expected = sigmoid(logits(tiny_model, DOCS, query="how do"))
    assert {r["index"]: r["relevance_score"] for r in results} == pytest.approx(
        dict(enumerate(expected)), abs=1e-6
    )
    assert not np.allclose(expected, sigmoid(logits(tiny_model, DOCS)))  # the cut changed the scores


def test_every_dialect_path_is_documented_and_retried_by_the_proxy(app):
    """OpenAPI has every dialect's path with its request body and every error status; the proxy's
    idempotent routes are exactly the dialects' paths."""
    paths = {path for dialect in all_dialects() for path in dialect.paths}
    assert {path.rsplit("}", 1)[-1] for path in paths} == SCORING_ROUTES  # a path parameter: its tail
    spec = app.get("/openapi.json").json()
    for path in paths:
        post = spec["paths"][path]["post"]
        assert "requestBody" in post
        assert [parameter["name"] for parameter in post.get("parameters", [])] == re.findall(r"{(\w+)}", path)
        assert {"200", "400", "401", "404", "413", "422", "500", "503"} <= set(post["responses"])


@pytest.mark.parametrize(
    ("path", "extra"),
    [("/infinity/rerank", {}), ("/rerank", {"raw_scores": False}), ("/rerank", {"raw_scores": True})],
)
def test_infinity_documents_as_strings(app, tiny_model, path, extra):
    """infinity's clients: results whose document is a plain string, on its own path or where raw_scores
    says so; raw_scores true gives logits. A Cohere / vLLM body on /rerank keeps {"text": ...}."""
    body = {"query": QUERY, "documents": DOCS, "top_n": 3, "return_documents": True, **extra}
    payload = app.post(path, json=body).json()
    assert payload["object"] == "rerank" and len(payload["results"]) == 3
    raw = logits(tiny_model, DOCS)
    expected = raw if extra.get("raw_scores") else sigmoid(raw)
    for result in payload["results"]:
        assert result["document"] == DOCS[result["index"]]
        assert result["relevance_score"] == pytest.approx(float(expected[result["index"]]), abs=1e-5)
    vllm = app.post("/rerank", json={"query": QUERY, "documents": DOCS, "return_documents": True}).json()
    assert vllm["results"][0]["document"] == {"text": DOCS[vllm["results"][0]["index"]]}
