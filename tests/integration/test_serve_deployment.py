"""The deployment itself on a real (local) Ray Serve: replica start-up, ingress, auth and user_config.

Route behaviour is tested in-process (tests/unit/test_api.py); these few tests cover what only a
running Serve shows.
"""

import json
import re
import threading
import time

import numpy as np
import pytest
import requests

from reranker.model import sigmoid
from tests.helpers import REPO_ROOT
from tests.serve_helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

QUERY = "how do solar panels work"
DOCS = ["solar panels convert sunlight", "bananas are yellow", "the sun makes energy", "python language"]


def deploy(model_dir, user_config):
    """The shipped app as `serve deploy` sends it (import path and args; a user_config change alone
    reconfigures the running replicas), with the API key only in the replicas' env."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    replica_env = {"env_vars": {"RERANK_API_KEY": "sekret"}}
    deployment = {
        "name": "Reranker",
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0.1, "runtime_env": replica_env},
        "user_config": user_config,
    }
    application = {
        "name": "rerank",
        "route_prefix": "/",
        "import_path": "serve.app:build_app",
        "args": {"model": str(model_dir)},
        "deployments": [deployment],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [application]}))


def wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def health(url):
    """/health's answer, or None while nothing answers it yet."""
    try:
        response = requests.get(url + "/health", timeout=5)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def replica_batching():
    """The batching settings in force in the replica, through a deployment handle."""
    from ray import serve

    return serve.get_deployment_handle("Reranker", app_name="rerank").batching.remote().result()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """Serve on 127.0.0.1 with a user_config; the driver (this process) has no RERANK_* variables."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(tiny_model_dir, {"max_batch_pairs": 8, "batch_wait_timeout_s": 0.01})
    wait_for(lambda: health(f"http://127.0.0.1:{port}") is not None)
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


def test_an_api_key_only_in_the_replicas_env_is_enforced(server):
    """RERANK_API_KEY set only in the replica's env (as a pod's env is) holds behind Serve's proxy;
    /health stays open."""
    body = {"query": QUERY, "documents": DOCS}
    assert post(server, "/v1/rerank", body, key=None).status_code == 401
    assert post(server, "/v1/rerank", body, key="wrong").json()["error"]["type"] == "authentication_error"
    assert requests.get(server + "/health", timeout=10).json() == {"status": "ok"}


def test_user_config_reached_the_replica(server):
    """The replica runs with the user_config's cap (8, not the default 1024) and answers larger requests."""
    assert replica_batching()["max_batch_pairs"] == 8
    documents = DOCS * 5
    response = post(server, "/score", {"pairs": [[QUERY, d] for d in documents]})
    assert response.status_code == 200 and len(response.json()["scores"]) == 20
    assert response.json()["scores"][:4] == pytest.approx(response.json()["scores"][4:8], abs=1e-6)


def test_lowering_the_cap_under_load_fails_no_request(server, tiny_model_dir, tiny_model):
    """A new user_config (cap 8 -> 1) reaches a replica under concurrent load: every request is a 200
    with the scores it gets alone."""
    assert replica_batching()["max_batch_pairs"] == 8  # as the fixture deployed it
    bodies = [[[f"{QUERY} {i}", d] for d in DOCS * 3] for i in range(6)]
    expected = [tiny_model.score([q for q, _ in b], [p for _, p in b]).scores for b in bodies]
    stop, answers = threading.Event(), []

    def client(index: int) -> None:
        while not stop.is_set():
            response = post(server, "/score", {"pairs": bodies[index]})
            answers.append((index, response.status_code, response.json()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    deploy(tiny_model_dir, {"max_batch_pairs": 1, "batch_wait_timeout_s": 0.01})
    changed_at = len(answers)
    wait_for(lambda: replica_batching()["max_batch_pairs"] == 1)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert replica_batching()["max_batch_pairs"] == 1
    assert len(answers) > changed_at > 0  # requests ran before and after the change
    for index, status, payload in answers:
        assert status == 200, payload
        np.testing.assert_allclose(payload["scores"], expected[index], atol=1e-5)


def test_a_bad_user_config_is_refused_and_the_replica_keeps_serving(server, tiny_model_dir):
    """A user_config every replica must refuse (Ray stops a replica whose reconfigure raises, and its
    replacements fail the same way: an outage): the running replica keeps its batching and answers,
    /health names the refusal, and a good user_config clears it, all without a restart."""
    deploy(tiny_model_dir, {"max_batch_pairs": 8, "batch_wait_timeout_s": 0.01})
    wait_for(lambda: replica_batching()["max_batch_pairs"] == 8)
    before = replica_batching()
    deploy(tiny_model_dir, {"max_batch_pairs": 0, "batch_wait_timeout_s": 0.5})
    wait_for(lambda: bool((health(server) or {}).get("config_refused")))
    assert "max_batch_pairs" in health(server)["config_refused"]["stage1"]
    assert replica_batching() == before  # the same replica (a new one would have the settings' 1024)
    assert post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200
    deploy(tiny_model_dir, {"max_batch_pairs": 4})
    wait_for(lambda: health(server) == {"status": "ok"})
    assert replica_batching()["max_batch_pairs"] == 4


def scrape() -> dict[str, set[frozenset[str]]]:
    """This node's Prometheus endpoint as Ray exports it: each metric name and its series' label names."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    series: dict[str, set[frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).add(frozenset(sample.labels))
    return series


def test_the_metrics_a_scrape_shows_are_the_documented_and_charted_ones(server, tiny_model_dir):
    """Traffic (a rerank with a truncated document, a TEI rerank, an error, a refused user_config), then
    a real scrape: every ray_rerank_* name the docs list is there with Serve's deployment / replica /
    application labels, and every metric the Grafana dashboard charts is there."""
    deploy(tiny_model_dir, {"max_batch_pairs": 0})
    wait_for(lambda: bool((health(server) or {}).get("config_refused")))
    deploy(tiny_model_dir, {"max_batch_pairs": 8})
    wait_for(lambda: health(server) == {"status": "ok"})
    post(server, "/v1/rerank", {"query": QUERY, "documents": [*DOCS, "solar " * 100]})  # one is truncated
    post(server, "/rerank", {"query": QUERY, "texts": DOCS})
    assert post(server, "/v1/rerank", {"query": QUERY, "documents": []}).status_code == 422
    documented = set(re.findall(r"`(ray_rerank_\w+)", (REPO_ROOT / "docs" / "serving.md").read_text()))
    dashboard = json.loads((REPO_ROOT / "configs" / "grafana-dashboard.json").read_text())
    charted = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(ray_\w+)\{", target["expr"])}  # fmt: skip
    assert len(documented) >= 9 and len(charted) >= 10
    wanted = documented | charted
    wait_for(lambda: wanted <= set(scrape()), timeout_s=90)  # Ray exports every few seconds
    series = scrape()
    for name in documented:
        assert any({"deployment", "replica", "application"} <= labels for labels in series[name]), name
