"""The client compatibility matrix: each rerank client library, unmodified, pointed at a live Serve on
127.0.0.1 by its base URL, reranks real DL19 text; what it parses equals the model class in-process
(order and scores, 1e-4). The libraries come with the ``clients`` extra."""

from importlib.util import find_spec

import numpy as np
import pytest
import requests

from reranker.model import CrossEncoderModel, sigmoid
from tests.helpers import DL19_TSV, TWIN_MODEL, read_trec_tsv, require
from tests.integration.clients import CLIENTS
from tests.integration.test_serve_deployment import wait_for
from tests.serve_helpers import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("ray_session"),
    pytest.mark.skipif(
        find_spec("litellm") is None, reason="the client libraries: pip install -e '.[clients]'"
    ),
]

SERVED = "ms-marco-twin"
TOP_N = 3


@pytest.fixture(scope="module")
def dl19():
    """One DL19 query and 8 of its BM25 passages (real MS MARCO text)."""
    frame = read_trec_tsv(require(DL19_TSV))
    first = frame[frame["qid"] == frame["qid"].iloc[0]].head(8)
    return str(first["query"].iloc[0]), [str(text) for text in first["passage"]]


@pytest.fixture(scope="module")
def server():
    """The shipped app on Serve (the TinyBERT-L2 twin, served as SERVED), no API key: its base URL."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    application = {
        "name": "rerank",
        "route_prefix": "/",
        "import_path": "serve.app:build_app",
        "args": {"model": str(require(TWIN_MODEL)), "served_model_name": SERVED},
        "deployments": [{"name": "Reranker", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [application]}))
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _healthy(url), timeout_s=120)
    yield url
    serve.shutdown()


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def logits(dl19):
    query, passages = dl19
    return CrossEncoderModel(str(require(TWIN_MODEL))).score([query] * len(passages), passages).scores


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_the_client_ranks_as_the_model_does(server, dl19, logits, name):
    client = CLIENTS[name]
    query, passages = dl19
    ranked = client.call(server, SERVED, query, passages, TOP_N)
    order = np.argsort(-logits, kind="stable").tolist()
    expected = order[:TOP_N] if client.cut else order
    assert [int(index) for index, _ in ranked] == expected
    scores = logits if client.scale == "logit" else sigmoid(logits)
    np.testing.assert_allclose([score for _, score in ranked], scores[expected], atol=1e-4)
