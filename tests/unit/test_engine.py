"""The engine's batching and the deployment's run-time configuration, without a running Serve."""

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reranker.errors import ConfigError
from reranker.model import CrossEncoderModel
from serve import app as serve_app
from serve.engine import BatchingConfig, RerankEngine, Truncation
from serve.settings import ServeSettings
from tests.serve_helpers import InstrumentedModel, RecordingMetrics

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

    async def scenario() -> None:
        await reconfigure(replica, {"max_batch_pairs": 3, "max_pending_pairs": 50})
        engine = replica.service.engine
        assert (engine.batching.max_batch_pairs, engine.batching.max_pending_pairs) == (3, 50)
        await engine.score(["q"] * 7, ["solar"] * 7)
        assert max(metrics.batch_pairs.values) <= 3
        with pytest.raises(ConfigError, match="unknown_knob"):
            await reconfigure(replica, {"unknown_knob": 1})
        assert engine.batching.max_batch_pairs == 3  # a refused config changes nothing

    asyncio.run(scenario())


def test_lowering_the_cap_while_requests_are_queued_fails_none(tiny_model):
    """max_batch_pairs 8 -> 2 by user_config with 8-pair chunks queued: every request scores, unchanged."""
    release = threading.Event()
    held = InstrumentedModel(tiny_model, hook=lambda queries, passages: release.wait(10))
    engine = RerankEngine(held, CONFIG.updated({"max_batch_pairs": 8}))  # type: ignore[arg-type]
    replica = SimpleNamespace(service=SimpleNamespace(engine=engine, stages=[engine]))
    requests = [[f"passage {i} {word}" for word in ("solar", "sun", "wind", "moon") * 2] for i in range(6)]

    async def scenario() -> list:
        engine = replica.service.engine
        pending = [asyncio.ensure_future(engine.score(["query"] * 8, passages)) for passages in requests]
        await asyncio.sleep(0.2)  # the first batch holds the model thread; the other chunks (8 pairs) queue
        await serve_app.Reranker.func_or_class.reconfigure(replica, {"max_batch_pairs": 2})
        release.set()
        return await asyncio.gather(*pending, return_exceptions=True)

    results = asyncio.run(scenario())
    assert not [r for r in results if isinstance(r, BaseException)], results
    for passages, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result.scores, tiny_model.score(["query"] * 8, passages).scores, atol=1e-5)
    assert replica.service.engine._queue_limit == 2  # back to the new cap once the old chunks drained
    assert max(n for method, n in held.calls[1:] if method == "tokenize") <= 8


def test_a_failing_request_fails_alone(tiny_model):
    """A request the model fails on, coalesced with others into one batch, is the only one that fails."""
    release = threading.Event()

    def hook(queries, passages):
        release.wait(10)
        if any("poison" in passage for passage in passages):
            raise ValueError("cannot score this passage")

    engine = RerankEngine(InstrumentedModel(tiny_model, hook), CONFIG, RecordingMetrics())  # type: ignore[arg-type]
    bodies = [["solar", "sun"], ["wind", "poison"], ["moon", "banana"], ["stock", "market"]]

    async def scenario() -> list:
        first = asyncio.ensure_future(engine.score(["q"] * 2, ["held", "batch"]))
        await asyncio.sleep(0.1)  # the first batch holds the model; the rest queue and coalesce
        rest = [asyncio.ensure_future(engine.score(["q"] * 2, body)) for body in bodies]
        await asyncio.sleep(0.1)
        release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(scenario())
    assert isinstance(results[2], ValueError)
    calls = engine.model.calls  # type: ignore[union-attr]
    assert any(n > 2 for method, n in calls if method == "tokenize")  # the poisoned request shared a batch
    for body, result in zip(bodies, results[1:], strict=True):
        if "poison" not in body:
            np.testing.assert_allclose(result.scores, tiny_model.score(["q"] * 2, body).scores, atol=1e-5)


def test_engine_returns_raw_logits_whatever_the_model_activation(tiny_model_dir, tiny_model):
    """A model loaded with activation=sigmoid still gives the engine raw logits (routes apply it once)."""
    sigmoid_model = CrossEncoderModel(str(tiny_model_dir), activation="sigmoid")
    engine = RerankEngine(sigmoid_model, CONFIG)
    result = asyncio.run(engine.score(["q"] * 4, ["solar", "sun", "wind", "moon"]))
    logits = tiny_model.score(["q"] * 4, ["solar", "sun", "wind", "moon"], activation="none").scores
    np.testing.assert_allclose(result.scores, logits, atol=1e-6)
    assert (logits < 0).any() or (logits > 1).any()  # logits, not probabilities: the check can fail


def test_the_service_refuses_an_activation_setting(tiny_model_dir):
    """activation is not a service setting: args, env or file naming it fail with one line."""
    with pytest.raises(ConfigError, match="activation: not a service setting"):
        ServeSettings.load(file_values={"model": str(tiny_model_dir), "activation": "sigmoid"})
    with pytest.raises(ConfigError, match="activation"):
        serve_app.build_app({"model": str(tiny_model_dir), "activation": "sigmoid"})


def test_health_checks_share_one_probe_and_reuse_real_batches(tiny_model):
    """50 concurrent health checks run one forward pass; after a real batch, none; past the interval, one."""
    counted = InstrumentedModel(tiny_model)
    engine = RerankEngine(counted, CONFIG, health_interval_s=0.5)  # type: ignore[arg-type]

    async def scenario() -> None:
        await asyncio.gather(*(engine.health_check() for _ in range(50)))
        assert [method for method, _ in counted.calls] == ["score"]
        await engine.score(["q"], ["solar"])
        await asyncio.sleep(0.3)
        await asyncio.gather(*(engine.health_check() for _ in range(50)))
        assert [method for method, _ in counted.calls] == ["score", "tokenize"]  # the batch counted
        await asyncio.sleep(0.6)
        await engine.health_check()
        assert [method for method, _ in counted.calls] == ["score", "tokenize", "score"]

    asyncio.run(scenario())


def test_a_failed_probe_is_reported_until_the_model_scores_again(tiny_model):
    """A probe that fails makes health checks raise (no new probe within the interval)."""
    broken = InstrumentedModel(tiny_model, hook=lambda q, p: (_ for _ in ()).throw(RuntimeError("CUDA lost")))
    engine = RerankEngine(broken, CONFIG, health_interval_s=60)  # type: ignore[arg-type]

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(RuntimeError, match="CUDA lost"):
                await engine.health_check()

    asyncio.run(scenario())
    assert len(broken.calls) == 1


def test_build_app_checks_args_and_leaves_resolution_to_the_replica(monkeypatch, tiny_model_dir):
    """build_app passes the args on unresolved (the replica reads its own env); bad ones fail at once."""
    bound = []
    monkeypatch.setattr(serve_app, "Reranker", type("Stub", (), {"bind": staticmethod(bound.append)}))
    args = {"model": str(tiny_model_dir), "max_documents": 3}
    serve_app.build_app(args)
    assert bound == [args]
    with pytest.raises(ConfigError, match="max_docs"):
        serve_app.build_app({"max_docs": 3})


def test_the_replica_resolves_settings_from_its_own_env(monkeypatch, tiny_model_dir):
    """RERANK_* in the replica's env beat the args: an API key set only there is enforced."""
    monkeypatch.setenv("RERANK_MAX_DOCUMENTS", "7")
    monkeypatch.setenv("RERANK_API_KEY", "replica-only")
    service = serve_app.replica_service(
        {"model": str(tiny_model_dir), "max_documents": 3, "torch_threads": 1}, None
    )
    serving = service.settings.serving
    assert serving.max_documents == 7 and serving.api_key.get_secret_value() == "replica-only"
