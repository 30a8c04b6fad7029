"""A cascade behind the rerank routes, in-process: stage 1 scores every document, stage 2 the best k."""

import numpy as np
import pytest

from reranker.model import sigmoid
from tests.serve_helpers import serving

pytestmark = pytest.mark.unit

QUERY = "how do solar panels work"
DOCS = [
    "solar panels convert sunlight",
    "bananas are yellow",
    "the sun makes energy",
    "python language",
    "wind farms at sea",
    "basil needs water",
]


def rerank(client, body, path="/v1/rerank"):
    response = client.post(path, json={"query": QUERY, **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_k_equal_to_the_documents_is_stage_2_alone(tiny_model, larger_model, path):
    """Every document reaches stage 2: the same order and scores as stage 2 served alone (Cohere, TEI)."""
    key = "documents" if path == "/v1/rerank" else "texts"
    cascade_app = serving([tiny_model, larger_model], rerank_count=len(DOCS))
    with cascade_app as cascade, serving(larger_model) as alone:
        ours, theirs = rerank(cascade, {key: DOCS}, path), rerank(alone, {key: DOCS}, path)
    ours, theirs = (payload["results"] if path == "/v1/rerank" else payload for payload in (ours, theirs))
    assert [r["index"] for r in ours] == [r["index"] for r in theirs]
    score = "relevance_score" if path == "/v1/rerank" else "score"
    np.testing.assert_allclose([r[score] for r in ours], [r[score] for r in theirs], atol=1e-5)


def test_the_best_k_go_to_stage_2_and_the_rest_keep_stage_1_order(tiny_model, larger_model):
    """k=2: stage 1's best two, ordered by stage 2, rank above the rest, which follow in stage-1 order;
    each stage's score is returned on request (null where a document did not reach stage 2). The rest
    report their stage-1 score, unless it would rank above a stage-2 score (then it is shifted below)."""
    first = tiny_model.score([QUERY] * len(DOCS), DOCS).scores
    second = larger_model.score([QUERY] * len(DOCS), DOCS).scores
    best_two = sorted(np.argsort(-first, kind="stable")[:2], key=lambda i: -second[i])
    rest = [int(i) for i in np.argsort(-first, kind="stable")[2:]]
    with serving([tiny_model, larger_model], rerank_count=2) as client:
        results = rerank(client, {"documents": DOCS, "return_stage_scores": True})["results"]
        plain = rerank(client, {"documents": DOCS})["results"]
    assert [r["index"] for r in results] == [int(i) for i in best_two] + rest
    for result in results:
        stages, i = result["stage_scores"], result["index"]
        assert stages["stage1"] == pytest.approx(float(sigmoid(first[i])), abs=1e-5)
        if i in best_two:
            assert stages["stage2"] == pytest.approx(float(sigmoid(second[i])), abs=1e-5)
            assert result["relevance_score"] == stages["stage2"]
        else:
            assert stages["stage2"] is None
            if float(sigmoid(first[i])) < results[1]["relevance_score"]:
                assert result["relevance_score"] == stages["stage1"]
    relevance = [r["relevance_score"] for r in results]
    assert relevance == sorted(relevance, reverse=True)
    assert all("stage_scores" not in result for result in plain)  # the Cohere shape is unchanged by default


def test_a_request_can_change_k_within_the_configured_maximum(tiny_model, larger_model):
    """rerank_count in the body replaces the configured k; past max_rerank_count it is a 422."""
    with serving([tiny_model, larger_model], rerank_count=1, max_rerank_count=4) as client:
        body = {"documents": DOCS, "return_stage_scores": True}
        reached = [r for r in rerank(client, body)["results"] if r["stage_scores"]["stage2"] is not None]
        assert len(reached) == 1
        wider = rerank(client, {**body, "rerank_count": 4})["results"]
        assert sum(r["stage_scores"]["stage2"] is not None for r in wider) == 4
        tei = rerank(client, {"texts": DOCS, "rerank_count": 3, "return_stage_scores": True}, "/rerank")
        assert sum(r["stage_scores"]["stage2"] is not None for r in tei) == 3
        response = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "rerank_count": 5})
    assert response.status_code == 422 and "rerank_count" in response.json()["error"]["message"]


def test_score_uses_the_last_stage_and_metrics_are_per_stage(tiny_model, larger_model):
    """/score is single-stage (the last, most precise model); pair counts are tagged by stage."""
    with serving([tiny_model, larger_model], rerank_count=2) as client:
        scores = client.post("/score", json={"pairs": [[QUERY, doc] for doc in DOCS]}).json()["scores"]
        rerank(client, {"documents": DOCS})
        metrics = client.app.state.service.metrics
    np.testing.assert_allclose(scores, larger_model.score([QUERY] * len(DOCS), DOCS).scores, atol=1e-5)
    by_stage: dict[str, float] = {}
    for value, tags in zip(metrics.pairs.values, metrics.pairs.tags, strict=True):
        by_stage[tags["stage"]] = by_stage.get(tags["stage"], 0) + value
    assert by_stage == {"stage1": len(DOCS), "stage2": len(DOCS) + 2}


class FailingHandle:
    """A deployment handle whose ``score`` call fails with ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.score = self

    def remote(self, *args):
        async def fail():
            raise self.error

        return fail()


def test_a_stage_deployment_that_is_overloaded_is_a_503_not_a_500():
    """Through a handle: Serve's backpressure and the stage's own overload both come back as
    OverloadedError (the routes' 503 with Retry-After), without the remote traceback in the message."""
    import asyncio

    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from serve.cascade import RemoteStage
    from serve.errors import OverloadedError

    busy = OverloadedError("server busy: 9000 pairs queued (limit 8192)")
    remote_error = RayTaskError("score", "Traceback (most recent call last): ...", busy)
    backpressure = BackPressureError(num_queued_requests=129, max_queued_requests=128)
    for error, words in ((remote_error, "server busy: 9000"), (backpressure, "cascade stage is busy")):
        with pytest.raises(OverloadedError, match=words) as raised:
            asyncio.run(RemoteStage(FailingHandle(error), 512).score(["q"], ["p"]))
        assert "Traceback" not in str(raised.value)


@pytest.fixture(scope="module")
def low_scoring_model(tmp_path_factory):
    """A tiny cross-encoder whose logits sit near -10: below every score of the other tiny model."""
    from reranker.model import CrossEncoderModel
    from tests.helpers import build_tiny_cross_encoder

    return CrossEncoderModel(
        str(build_tiny_cross_encoder(tmp_path_factory.mktemp("low"), logit_offset=-10.0))
    )


@pytest.mark.parametrize(
    ("path", "body", "score"),
    [
        ("/v1/rerank", {"documents": DOCS}, "relevance_score"),
        ("/v2/rerank", {"documents": DOCS}, "relevance_score"),
        ("/rerank", {"documents": DOCS}, "relevance_score"),
        ("/rerank", {"texts": DOCS}, "score"),
        ("/rerank", {"texts": DOCS, "raw_scores": True}, "score"),
    ],
)
def test_reported_scores_follow_the_order_on_every_route(tiny_model, low_scoring_model, path, body, score):
    """Stage 2 scores lower than stage 1 ever does: the documents that stopped at stage 1 would report
    higher scores than the ones ranked above them. On every route the scores never increase down the
    order, the stage-2 scores are reported as they are, and stage_scores keeps the raw per-stage values."""
    first = tiny_model.score([QUERY] * len(DOCS), DOCS).scores
    second = low_scoring_model.score([QUERY] * len(DOCS), DOCS).scores
    assert first.min() > second.max()  # the inversion this test is about
    with serving([tiny_model, low_scoring_model], rerank_count=2) as client:
        payload = rerank(client, {**body, "return_stage_scores": True}, path)
    results = payload["results"] if isinstance(payload, dict) else payload
    reported = [r[score] for r in results]
    assert reported == sorted(reported, reverse=True) and len(set(reported)) == len(reported)
    raw = body.get("raw_scores", False)
    for result in results[:2]:
        expected = second[result["index"]] if raw else sigmoid(second[result["index"]])
        assert result[score] == pytest.approx(float(expected), abs=1e-6)
    for result in results[2:]:
        expected = first[result["index"]] if raw else sigmoid(first[result["index"]])
        assert result["stage_scores"]["stage1"] == pytest.approx(float(expected), abs=1e-6)


def test_truncation_is_counted_once_per_document(tiny_model, larger_model):
    """Ten documents, five longer than both models' limit, all through both stages: 5 truncated, not 10;
    TEI's truncate=false refusal counts the same way."""
    documents = ["solar " * 200 if i % 2 else "solar panels" for i in range(10)]
    with serving([tiny_model, larger_model], rerank_count=10) as client:  # every document reaches stage 2
        meta = rerank(client, {"documents": documents})["meta"]
        refused = client.post("/rerank", json={"query": QUERY, "texts": documents, "truncate": False})
    assert meta["truncated_documents"] == 5
    assert refused.status_code == 413 and refused.json()["error"]["message"].startswith("texts: 5 inputs")


class DyingHandle:
    """A deployment handle whose ``score`` replica dies ``deaths`` times, then answers with ``scored``."""

    def __init__(self, deaths: int, scored) -> None:
        self.deaths, self.scored, self.calls = deaths, scored, 0
        self.score = self

    def remote(self, *args):
        from ray.exceptions import ActorDiedError

        self.calls += 1

        async def answer():
            if self.calls <= self.deaths:
                raise ActorDiedError()
            return self.scored

        return answer()


def test_a_stage_replica_that_dies_is_retried_once_then_a_503():
    """A stage call lost to a dead replica is sent again once (scoring is idempotent); lost twice, it is
    the designed 503 replica_unavailable, never a 500."""
    import asyncio

    from serve.cascade import RemoteStage
    from serve.engine import Scored
    from serve.errors import ReplicaLostError

    scored = Scored(np.array([1.0], np.float32), 3, np.array([False]))
    once = DyingHandle(1, scored)
    assert asyncio.run(RemoteStage(once, 512).score(["q"], ["p"])) is scored and once.calls == 2
    twice = DyingHandle(2, scored)
    with pytest.raises(ReplicaLostError, match="stopped; retry the request"):
        asyncio.run(RemoteStage(twice, 512, "stage2").score(["q"], ["p"]))
    assert twice.calls == 2
