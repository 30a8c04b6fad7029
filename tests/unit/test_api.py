"""Routes, schemas, errors and auth of the rerank API, in-process (no Serve): FastAPI over the engine."""

import asyncio
import json

import numpy as np
import pytest

from reranker.model import sigmoid
from tests.serve_helpers import in_app_loop, serving

pytestmark = pytest.mark.unit

QUERY = "how do solar panels work"
DOCS = ["solar panels convert sunlight", "bananas are yellow", "the sun makes energy", "python language"]
LIMITS = {"max_documents": 50, "max_document_chars": 2000, "max_body_bytes": 64 * 1024}


@pytest.fixture(scope="module")
def app(tiny_model):
    """A client of one app (deployment limits set) for the module; its engine lives on one event loop."""
    with serving(tiny_model, **LIMITS) as client:
        yield client


def post(client, path, body, **kwargs):
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    if isinstance(body, (bytes, str)):
        return client.post(path, content=body, headers=headers, **kwargs)
    return client.post(path, json=body, headers=headers, **kwargs)


def request(client, method, path, **kwargs):
    return client.request(method, path, **kwargs)


def assert_error(response, status, error_type, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and set(error) == {"type", "message"}
    for word in words:
        assert word in error["message"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_cohere_style_rerank_sorted_with_documents(app, tiny_model, path):
    """Cohere/Jina/vLLM shape: sigmoid relevance, best first, top_n, documents echoed, no debug fields."""
    documents = [DOCS[0], {"text": DOCS[1]}, DOCS[2], DOCS[3]]
    response = post(app, path, {"query": QUERY, "documents": documents, "top_n": 3, "return_documents": True})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"id", "model", "results", "usage", "meta"}
    assert set(payload["meta"]) == {"api_version", "billed_units", "tokens", "truncated_documents"}
    expected = sigmoid(tiny_model.score([QUERY] * 4, DOCS).scores)
    results = payload["results"]
    assert [r["index"] for r in results] == np.argsort(-expected, kind="stable")[:3].tolist()
    for result in results:
        assert result["relevance_score"] == pytest.approx(float(expected[result["index"]]), abs=1e-5)
        assert result["document"] == {"text": DOCS[result["index"]]}
    assert payload["usage"]["total_tokens"] > 0


def test_documents_are_left_out_unless_asked(app):
    """return_documents defaults to false."""
    results = post(app, "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()["results"]
    assert len(results) == 4 and all(r.get("document") is None for r in results)


def test_max_tokens_per_doc_cuts_each_document(app, tiny_model):
    """max_tokens_per_doc scores each document cut to that many of its own tokens."""
    body = {"query": QUERY, "documents": ["solar panels convert sunlight", "sun"], "max_tokens_per_doc": 2}
    results = post(app, "/v1/rerank", body).json()["results"]
    expected = sigmoid(tiny_model.score([QUERY] * 2, ["solar panels", "sun"]).scores)
    by_index = {r["index"]: r["relevance_score"] for r in results}
    assert by_index == pytest.approx({0: float(expected[0]), 1: float(expected[1])}, abs=1e-5)


def test_tei_rerank_bare_sorted_array(app, tiny_model):
    """TEI shape: a bare array sorted by score; raw_scores gives logits, else sigmoid."""
    raw = post(
        app, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True}
    ).json()
    logits = tiny_model.score([QUERY] * 4, DOCS).scores
    assert [r["index"] for r in raw] == np.argsort(-logits, kind="stable").tolist()
    assert raw[0]["score"] == pytest.approx(float(logits[raw[0]["index"]]), abs=1e-5)
    assert raw[0]["text"] == DOCS[raw[0]["index"]]
    probs = post(app, "/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert probs[0]["score"] == pytest.approx(float(sigmoid(logits)[probs[0]["index"]]), abs=1e-5)
    assert probs[0].get("text") is None


def test_tei_left_truncation_cuts_the_start(app):
    """Over-long texts: "Left" keeps the end (texts that differ only at the start tie), "Right" the start."""
    filler = " banana" * 120  # far past the tiny model's 64 tokens
    differ_at_start = ["solar sun energy" + filler, "python stock market" + filler]
    differ_at_end = [filler + " solar sun energy", filler + " python stock market"]

    def scores(texts, direction):
        body = {"query": QUERY, "texts": texts, "raw_scores": True, "truncation_direction": direction}
        return {r["index"]: r["score"] for r in post(app, "/rerank", body).json()}

    left, right = scores(differ_at_start, "Left"), scores(differ_at_start, "Right")
    assert (
        abs(left[0] - left[1]) < 1e-9 < 1e-8 < abs(right[0] - right[1])
    )  # the tiny model's scores spread little
    left, right = scores(differ_at_end, "Left"), scores(differ_at_end, "Right")
    assert abs(right[0] - right[1]) < 1e-9 < 1e-8 < abs(left[0] - left[1])


def test_tei_truncate_false_rejects_long_input(app):
    """truncate=false: an input over max_length is a 413."""
    body = {"query": QUERY, "texts": ["solar " * 200], "truncate": False}
    assert_error(post(app, "/rerank", body), 413, "payload_too_large", "truncate")


def test_score_pairs_in_input_order_matches_offline_model(app, tiny_model):
    """/score returns raw logits in input order: the job's scores for the same pairs."""
    payload = post(app, "/score", {"pairs": [[QUERY, d] for d in DOCS]}).json()
    np.testing.assert_allclose(payload["scores"], tiny_model.score([QUERY] * 4, DOCS).scores, atol=1e-5)


def test_health_models_and_openapi(app, tiny_model):
    """/health, /v1/models (OpenAI list) and an OpenAPI document generated from the typed bodies."""
    assert request(app, "GET", "/health").json() == {"status": "ok"}
    models = request(app, "GET", "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == tiny_model.name
    spec = request(app, "GET", "/openapi.json").json()
    assert {"/v1/rerank", "/v2/rerank", "/rerank", "/score", "/health", "/v1/models"} <= set(spec["paths"])
    assert {"RerankRequest", "TEIRerankRequest", "ScoreRequest", "RerankResponse"} <= set(
        spec["components"]["schemas"]
    )
    assert "requestBody" in spec["paths"]["/rerank"]["post"]
    assert request(app, "GET", "/docs").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "error_type", "words"),
    [
        ({"query": QUERY, "documents": ["d"] * 51}, 422, "validation_error", ("documents", "limit is 50")),
        ({"query": QUERY, "documents": ["x" * 2001]}, 422, "validation_error", ("documents", "2001 char")),
        ({"query": "q" * 2001, "documents": DOCS}, 422, "validation_error", ("query", "2001 characters")),
        ({"query": QUERY, "documents": DOCS, "top_n": -1}, 422, "validation_error", ("top_n",)),
        ({"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 10**20}, 422, "validation_error",
         ("max_tokens_per_doc",)),
        ({"query": QUERY, "documents": []}, 422, "validation_error", ("documents",)),
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
        "too-many", "too-long", "query-too-long", "top_n", "huge-max-tokens", "empty", "docs-type",
        "doc-item-type",
        "no-query", "empty-query", "unknown-model", "invalid-json", "not-object", "body-too-large",
    ],
)  # fmt: skip
def test_bad_input_gets_4xx_naming_the_field(app, body, status, error_type, words):
    """Every bad input is a 4xx in the one error shape; the server keeps serving."""
    assert_error(post(app, "/v1/rerank", body), status, error_type, *words)
    assert post(app, "/v1/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200


def test_tei_and_score_limits_name_their_fields(app):
    """The deployment's limits hold on /rerank (TEI) and /score too."""
    assert_error(
        post(app, "/rerank", {"query": QUERY, "texts": ["t"] * 51}), 422, "validation_error", "texts"
    )
    pairs = [[QUERY, "p" * 2001]]
    assert_error(post(app, "/score", {"pairs": pairs}), 422, "validation_error", "pairs", "a passage")


def test_chunked_body_over_the_limit_is_413(app):
    """A body without Content-Length is bounded too."""

    def chunks():
        for _ in range(70):
            yield b" " * 1000

    response = request(
        app, "POST", "/v1/rerank", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large", "bytes")


def test_unknown_route_uses_the_error_shape(app):
    """Even a 404 route answer has the one error shape."""
    assert_error(request(app, "GET", "/nope"), 404, "http_error")


def test_api_key_required_when_configured(tiny_model):
    """With an API key, requests need 'Authorization: Bearer <key>'; /health and the docs stay open."""
    with serving(tiny_model, api_key="sekret") as app:
        check_api_key(app)


def check_api_key(app):
    body = {"query": QUERY, "documents": DOCS}
    assert_error(post(app, "/v1/rerank", body), 401, "authentication_error")
    assert_error(
        post(app, "/v1/rerank", body, headers={"Authorization": "Bearer wrong"}), 401, "authentication_error"
    )
    assert_error(
        post(app, "/v1/rerank", body, headers={"Authorization": "Basic sekret"}), 401, "authentication_error"
    )
    assert_error(request(app, "GET", "/v1/models"), 401, "authentication_error")
    assert post(app, "/v1/rerank", body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert request(app, "GET", "/health").status_code == 200
    assert request(app, "GET", "/openapi.json").status_code == 200


def test_overload_answers_503_with_retry_after(tiny_model, monkeypatch):
    """Past the replica's queue bound a request gets 503 + Retry-After at once; the server recovers."""
    with serving(tiny_model, max_pending_pairs=10, retry_after_s=3) as app:
        engine = app.app.state.service.engine
        original = engine.queue.submit
        release = asyncio.Event()

        async def held(chunk):
            await release.wait()
            return await original(chunk)

        monkeypatch.setattr(engine.queue, "submit", held)

        async def scenario(client):
            blocker = asyncio.create_task(engine.score(["q"] * 10, ["p"] * 10))
            while engine.pending_pairs < 10:  # the first request holds the whole queue
                await asyncio.sleep(0)
            rejected = await client.post("/v1/rerank", json={"query": QUERY, "documents": ["solar"]})
            release.set()
            await blocker
            accepted = await client.post("/v1/rerank", json={"query": QUERY, "documents": ["solar"] * 10})
            return rejected, accepted

        rejected, accepted = in_app_loop(app, scenario)
    assert_error(rejected, 503, "overloaded", "limit 10")
    assert rejected.headers["Retry-After"] == "3"
    assert accepted.status_code == 200


def test_concurrent_mixed_requests_equal_the_same_requests_alone(app):
    """Concurrent requests mixing max_tokens_per_doc, TEI Left truncation and /score (so the model
    thread tokenizes with different truncation settings in one batch) each get the answer they get alone."""
    long_doc = "solar panels convert sunlight into electricity " * 12
    calls = []
    for i in range(8):
        calls.append(
            (
                "/v1/rerank",
                {"query": f"{QUERY} {i}", "documents": [long_doc, DOCS[i % 4]], "max_tokens_per_doc": 3 + i},
            )
        )
        calls.append(
            (
                "/rerank",
                {
                    "query": QUERY,
                    "texts": [long_doc + DOCS[i % 4]] * 2,
                    "truncation_direction": "Left",
                    "raw_scores": True,
                },
            )
        )
        calls.append(("/score", {"pairs": [[QUERY, long_doc], [f"q{i}", DOCS[i % 4]]]}))

    def comparable(response):
        """The body without its id, results keyed by index: the two identical TEI texts score within
        an ulp of each other, and which of them sorts first may differ with the batch they share."""
        assert response.status_code == 200, response.text
        payload = response.json()
        if isinstance(payload, list):
            return sorted(payload, key=lambda result: result["index"])
        payload = {k: v for k, v in payload.items() if k != "id"}
        if "results" in payload:
            payload["results"] = sorted(payload["results"], key=lambda result: result["index"])
        return payload

    alone = [comparable(post(app, path, body)) for path, body in calls]

    async def together(client):
        return await asyncio.gather(*(client.post(path, json=body) for path, body in calls))

    concurrent = [comparable(response) for response in in_app_loop(app, together)]
    assert _same(concurrent, alone)
    assert max(app.app.state.service.metrics.batch_requests.values) >= 2  # they really shared batches


def _same(left, right) -> bool:
    """Equal JSON, floats within 1e-5."""
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, float):
        return abs(left - right) <= 1e-5
    return left == right


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/rerank", {"query": QUERY, "documents": ["solar", "   "]}, ("documents", "document 1 is blank")),
        ("/v1/rerank", {"query": QUERY, "documents": [{"text": ""}, "x"]}, ("document 0 is blank",)),
        ("/v1/rerank", {"query": " \t", "documents": DOCS}, ("query", "blank")),
        ("/rerank", {"query": QUERY, "texts": ["sun", "solar", "\n"]}, ("texts", "text 2 is blank")),
        ("/score", {"pairs": [[QUERY, "sun"], ["  ", "solar"]]}, ("pairs", "the query of pair 1 is blank")),
        ("/score", {"pairs": [[QUERY, ""]]}, ("the passage of pair 0 is blank",)),
    ],
    ids=["cohere-doc", "cohere-object-doc", "cohere-query", "tei-text", "score-query", "score-passage"],
)
def test_blank_texts_are_refused_naming_their_index(app, path, body, words):
    """Online, an empty or whitespace-only text is a 422 naming its index (offline it gets a null score)."""
    assert_error(post(app, path, body), 422, "validation_error", *words)


def raising_app(tiny_model, error: Exception):
    """An app whose model raises ``error`` when it scores a passage containing "boom"."""
    from tests.serve_helpers import InstrumentedModel

    def hook(queries, passages):
        if any("boom" in passage for passage in passages):
            raise error

    return serving(InstrumentedModel(tiny_model, hook))


def test_internal_errors_give_a_request_id_not_details(tiny_model, caplog):
    """A 500 says only "internal error" and a request id; the detail is logged under that id."""
    detail = "tensor of shape [3, 4] at /srv/secret/weights.bin"
    with raising_app(tiny_model, RuntimeError(detail)) as app, caplog.at_level("ERROR", logger="ray.serve"):
        response = post(app, "/v1/rerank", {"query": QUERY, "documents": ["boom"]})
        assert post(app, "/v1/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200
    assert_error(response, 500, "internal_error", "request id")
    assert detail not in response.text and "RuntimeError" not in response.text
    request_id = response.headers["X-Request-Id"]
    assert request_id in response.json()["error"]["message"]
    logged = [record.getMessage() for record in caplog.records if request_id in record.getMessage()]
    assert logged and detail in logged[0]


def test_a_config_error_reaching_a_request_is_a_500(tiny_model):
    """The server's misconfiguration is not the client's fault: 500 in the generic shape, not 422."""
    from reranker.errors import ConfigError

    error = ConfigError("device: 'cuda:3' requested but CUDA is not available")
    with raising_app(tiny_model, error) as app:
        response = post(app, "/score", {"pairs": [[QUERY, "boom"]]})
    assert_error(response, 500, "internal_error", "request id")
    assert "cuda" not in response.text


def test_health_is_cheap_under_many_calls(tiny_model):
    """Many concurrent /health calls run at most one forward pass (a scored request counts as one)."""
    from tests.serve_helpers import InstrumentedModel

    counted = InstrumentedModel(tiny_model)
    with serving(counted) as app:

        async def hammer(client):
            return await asyncio.gather(*(client.get("/health") for _ in range(40)))

        assert {response.status_code for response in in_app_loop(app, hammer)} == {200}
        assert len(counted.calls) == 1
        assert post(app, "/v1/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200
        assert {response.status_code for response in in_app_loop(app, hammer)} == {200}
        assert len(counted.calls) == 2  # the request's batch, no new probe


def test_a_failing_health_probe_is_503(tiny_model):
    """A model that cannot score makes /health a 503 in the error shape, with Retry-After."""
    from tests.serve_helpers import InstrumentedModel

    def broken(queries, passages):
        raise RuntimeError("CUDA error: device lost")

    with serving(InstrumentedModel(tiny_model, broken)) as app:
        response = request(app, "GET", "/health")
    assert_error(response, 503, "overloaded", "cannot score")
    assert "Retry-After" in response.headers


def test_openapi_declares_every_status_with_the_error_shape(app):
    """Each route's OpenAPI entry lists every status it can answer, each with the error schema."""
    spec = request(app, "GET", "/openapi.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    expected = {
        ("/v1/rerank", "post"): {"200", "400", "401", "404", "413", "422", "500", "503"},
        ("/v2/rerank", "post"): {"200", "400", "401", "404", "413", "422", "500", "503"},
        ("/rerank", "post"): {"200", "400", "401", "404", "413", "422", "500", "503"},
        ("/score", "post"): {"200", "400", "401", "404", "413", "422", "500", "503"},
        ("/health", "get"): {"200", "500", "503"},
        ("/v1/models", "get"): {"200", "401", "500", "503"},
    }
    for (path, method), statuses in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == statuses, (path, sorted(responses))
        for status in statuses - {"200"}:
            assert responses[status]["content"]["application/json"]["schema"] == error_ref, (path, status)
