"""A cascade on a real (local) Ray Serve, in both layouts: every stage in one replica, or each stage its
own deployment behind the ingress (deployment handles)."""

import numpy as np
import pytest
import requests

from tests.serve_helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

QUERY = "how do solar panels work"
DOCS = ["solar panels convert sunlight", "bananas are yellow", "the sun makes energy", "python language"]


@pytest.fixture(scope="module", params=["one_replica", "deployment_per_stage"])
def cascade_server(request, tiny_model_dir, larger_model_dir):
    """The shipped app builder with a two-stage cascade (k=2) in the given layout, on 127.0.0.1."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "cascade": [
            {"model": str(tiny_model_dir), "rerank_count": 2, "cpus": 0.1},
            {"model": str(larger_model_dir), "cpus": 0.1},
        ],
        "cascade_layout": request.param,
    }
    serve.run(build_app(args), name="rerank", route_prefix="/")
    yield request.param, f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_the_cascade_answers_as_in_process(cascade_server, tiny_model, larger_model):
    """Through Serve's proxy, in either layout: stage 1's best two ordered by stage 2, then the rest in
    stage-1 order, with each stage's raw score on request; the layout's deployments are running."""
    from ray import serve

    layout, url = cascade_server
    first = tiny_model.score([QUERY] * 4, DOCS).scores
    second = larger_model.score([QUERY] * 4, DOCS).scores
    by_first = [int(i) for i in np.argsort(-first, kind="stable")]
    expected = sorted(by_first[:2], key=lambda i: -second[i]) + by_first[2:]
    body = {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_stage_scores": True}
    results = requests.post(url + "/rerank", json=body, timeout=60).json()
    assert [r["index"] for r in results] == expected
    for result in results:
        assert result["stage_scores"]["stage1"] == pytest.approx(float(first[result["index"]]), abs=1e-5)
    assert results[0]["score"] == pytest.approx(float(second[expected[0]]), abs=1e-5)
    deployments = set(serve.status().applications["rerank"].deployments)
    stages = {"RerankStage_stage1", "RerankStage_stage2"}
    assert deployments == ({"Reranker"} | stages if layout == "deployment_per_stage" else {"Reranker"})
