"""The engine's batching and the deployment's run-time configuration, without a running Serve."""

import asyncio
from types import SimpleNamespace

import pytest
import torch

from reranker.errors import ConfigError
from reranker.settings import ServeSettings
from serve import app as serve_app
from serve.engine import BatchingConfig, RerankEngine, Truncation
from tests.serve_helpers import RecordingMetrics

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("serve_batch_outside_serve")]
CONFIG = BatchingConfig(max_batch_pairs=64, batch_wait_timeout_s=0.05, max_pending_pairs=1000)


def test_concurrent_requests_share_a_model_batch(tiny_model):
    """Pairs of concurrent requests are scored in one model batch, and each gets its own scores back."""
    metrics = RecordingMetrics()
    engine = RerankEngine(tiny_model, CONFIG, metrics)  # type: ignore[arg-type]
    queries = [f"query {i}" for i in range(6)]

    async def together():
        return await asyncio.gather(
            *(engine.score([q] * 4, ["solar", "sun", "wind", "moon"]) for q in queries)
        )

    results = asyncio.run(together())
    assert max(metrics.batch_requests.values) >= 2 and max(metrics.batch_pairs.values) >= 8
    for query, result in zip(queries, results, strict=True):
        alone = tiny_model.score([query] * 4, ["solar", "sun", "wind", "moon"]).scores
        assert result.scores.tolist() == pytest.approx(alone.tolist(), abs=1e-6)


def test_requests_are_cut_into_chunks_of_max_batch_pairs(tiny_model):
    """A request larger than max_batch_pairs is split; no model batch exceeds it."""
    metrics = RecordingMetrics()
    engine = RerankEngine(tiny_model, CONFIG.updated({"max_batch_pairs": 5}), metrics)  # type: ignore[arg-type]
    result = asyncio.run(engine.score(["q"] * 12, ["solar panel"] * 12, Truncation(side="left")))
    assert len(result.scores) == 12 and max(metrics.batch_pairs.values) <= 5


def test_batching_config_rejects_unknown_keys_and_bad_values():
    """user_config with a typo or an invalid value is refused, naming it."""
    with pytest.raises(ConfigError, match="max_batch"):
        CONFIG.updated({"max_batch": 8})
    with pytest.raises(ConfigError, match="max_pending_pairs"):
        CONFIG.updated({"max_pending_pairs": 0})
    assert CONFIG.updated({"max_batch_pairs": 8}).max_batch_pairs == 8


def test_reconfigure_reaches_the_engine_and_the_model_batches(tiny_model):
    """Reranker.reconfigure applies user_config to the running engine (and its model batch cap)."""
    reconfigure = serve_app.Reranker.func_or_class.reconfigure
    metrics = RecordingMetrics()
    settings = ServeSettings.load(model=tiny_model.name)
    threads = torch.get_num_threads()  # unchanged: the model sets it process-wide
    replica = SimpleNamespace(service=serve_app.build_service(settings, threads, metrics))  # type: ignore[arg-type]
    reconfigure(replica, {"max_batch_pairs": 3, "max_pending_pairs": 50})
    engine = replica.service.engine
    assert (engine.batching.max_batch_pairs, engine.batching.max_pending_pairs) == (3, 50)
    asyncio.run(engine.score(["q"] * 7, ["solar"] * 7))
    assert max(metrics.batch_pairs.values) <= 3
    with pytest.raises(ConfigError, match="unknown_knob"):
        reconfigure(replica, {"unknown_knob": 1})
    assert engine.batching.max_batch_pairs == 3  # a refused config changes nothing


def test_build_app_args_sit_below_env_vars(monkeypatch, tiny_model_dir):
    """build_app: the config's args are settings at config-file precedence; RERANK_* env vars beat them."""
    bound = []
    monkeypatch.setattr(serve_app, "Reranker", type("Stub", (), {"bind": staticmethod(bound.append)}))
    monkeypatch.setenv("RERANK_MAX_DOCUMENTS", "7")
    serve_app.build_app({"model": str(tiny_model_dir), "max_documents": 3, "api_key": "k"})
    settings = bound[0]
    assert settings.model.model == str(tiny_model_dir) and settings.serving.max_documents == 7
    assert settings.serving.api_key.get_secret_value() == "k"
    with pytest.raises(ConfigError, match="max_docs"):
        serve_app.build_app({"max_docs": 3})
