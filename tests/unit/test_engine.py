"""The engine's batching and the deployment's run-time configuration, without a running Serve."""

import asyncio
import json
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
from serve.shape import app_shape, base_batching
from tests.serve_helpers import InstrumentedModel, RecordingMetrics

pytestmark = pytest.mark.unit
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
    """Reranker.reconfigure applies user_config to the running engine (and its model batch cap); a bad
    one is refused without raising (Serve would stop the replica): the settings in force stay, and the
    refusal is kept for /health and counted."""
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
        await reconfigure(replica, {"unknown_knob": 1})
        assert engine.batching.max_batch_pairs == 3  # a refused config changes nothing
        assert "unknown_knob" in (await replica.service.ranker.health_check())["stage1"]
        assert metrics.config_refused.values == [1]
        await reconfigure(replica, {"max_pending_pairs": 60})  # a key left out: back to its setting
        assert (engine.batching.max_batch_pairs, engine.batching.max_pending_pairs) == (1024, 60)
        assert await replica.service.ranker.health_check() == {}

    asyncio.run(scenario())


def test_user_config_keys_apply_per_stage_over_the_settings(tiny_model, larger_model):
    """A top-level key applies to every stage but one that declares that key itself; a stages entry
    applies to its stage alone; keys left out keep each stage's settings (env, args)."""
    settings = ServeSettings.load(
        model=tiny_model.name,
        max_batch_pairs=64,
        batch_wait_timeout_s=0.02,
        cascade=[
            {"model": tiny_model.name, "rerank_count": 2},
            {"model": larger_model.name, "max_batch_pairs": 16},
        ],
    )
    engines = [
        RerankEngine(model, base_batching(settings, number), stage=name)  # type: ignore[arg-type]
        for number, (model, name) in enumerate([(tiny_model, "stage1"), (larger_model, "stage2")])
    ]
    names = ["stage1", "stage2"]
    serve_app.apply_user_config(engines, {"max_batch_pairs": 256}, names, settings)
    assert [e.batching.max_batch_pairs for e in engines] == [256, 16]  # stage 2 declared its own
    assert [e.batching.batch_wait_timeout_s for e in engines] == [0.02, 0.02]  # from the settings
    user_config = {
        "max_batch_pairs": 256,
        "stages": {"stage2": {"max_batch_pairs": 8, "max_pending_pairs": 99}},
    }
    serve_app.apply_user_config(engines, user_config, names, settings)
    assert [(e.batching.max_batch_pairs, e.batching.max_pending_pairs) for e in engines] == [
        (256, 8192),
        (8, 99),
    ]
    serve_app.apply_user_config(engines, {"stages": {"stage3": {"max_batch_pairs": 1}}}, names, settings)
    assert all("stage3" in (e.config_refused or "") for e in engines)
    assert [e.batching.max_batch_pairs for e in engines] == [256, 8]  # refused: nothing changed


def test_lowering_the_cap_while_requests_are_queued_fails_none(tiny_model):
    """max_batch_pairs 8 -> 2 by user_config with 8-pair chunks queued: every request scores, unchanged."""
    release = threading.Event()
    held = InstrumentedModel(tiny_model, hook=lambda queries, passages: release.wait(10))
    engine = RerankEngine(held, CONFIG.updated({"max_batch_pairs": 8}))  # type: ignore[arg-type]
    replica = SimpleNamespace(
        service=SimpleNamespace(
            engine=engine, stages=[engine], settings=ServeSettings.load(model=tiny_model.name)
        )
    )
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
    assert replica.service.engine.queue.max_pairs == 2  # the old 8-pair chunks ran as batches of their own
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
    stub = type("Stub", (), {"bind": staticmethod(lambda *args: bound.append(args))})
    monkeypatch.setattr(serve_app, "Reranker", stub)
    args = {"model": str(tiny_model_dir), "max_documents": 3}
    serve_app.build_app(args)
    assert bound == [(args, (), {"layout": "one_replica", "stages": []})]
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


def test_the_queue_is_first_in_first_out_under_mixed_sizes(tiny_model):
    """With the model busy, a full-size chunk queued behind a small one is never passed over by later small
    ones: batches follow arrival order (Serve's serve.batch sends a chunk that doesn't fit to the back)."""
    release = threading.Event()
    held = InstrumentedModel(tiny_model, hook=lambda queries, passages: release.wait(10))
    engine = RerankEngine(held, CONFIG.updated({"max_batch_pairs": 8, "batch_wait_timeout_s": 0.0}))  # type: ignore[arg-type]
    sizes = [1, 2, 8, 1, 1, 1, 8, 2]

    async def scenario() -> None:
        first = asyncio.ensure_future(engine.score(["hold"], ["the model"]))
        await asyncio.sleep(0.1)  # the model thread is held; the rest queue in this order
        rest = []
        for number, size in enumerate(sizes):
            rest.append(asyncio.ensure_future(engine.score([f"q{number}"] * size, ["solar"] * size)))
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, *rest)

    asyncio.run(scenario())
    batches = [n for method, n in held.calls if method == "tokenize"][1:]
    assert batches == [3, 8, 3, 8, 2]  # 1+2 | 8 | 1+1+1 | 8 | 2: arrival order, never reordered


def test_a_document_truncated_by_several_stages_counts_once(tiny_model, larger_model):
    """Ten documents, five too long: a two-stage cascade that cuts them in both stages reports 5, not 10."""
    from serve.cascade import CascadeRanker

    engines = [RerankEngine(model, CONFIG) for model in (tiny_model, larger_model)]  # type: ignore[arg-type]
    documents = ["solar " * 200 if i % 2 else "solar panels" for i in range(10)]
    ranker = CascadeRanker(engines, [10], ["stage1", "stage2"])
    ranked = asyncio.run(ranker.rank("how do solar panels work", documents))
    assert ranked.num_truncated == 5
    assert ranked.truncated.tolist() == [bool(i % 2) for i in range(10)]


@pytest.mark.parametrize(
    "replica_env",
    [
        {"RERANK_CASCADE": "cascade"},  # a GPU stage 2 that would silently run in the CPU replica
        {"RERANK_CASCADE": "cascade", "RERANK_CASCADE_LAYOUT": "deployment_per_stage"},
    ],
)
def test_a_replica_whose_settings_make_another_app_refuses_to_start(
    tiny_model_dir, larger_model_dir, monkeypatch, replica_env
):
    """The build saw no cascade (one replica); a replica whose env adds one (or a per-stage layout) refuses
    to start with one line, instead of silently running the stages in the wrong place."""
    args = {"model": str(tiny_model_dir)}
    built = app_shape(ServeSettings.load(file_values=args))
    cascade = [{"model": str(tiny_model_dir), "rerank_count": 2}, {"model": str(larger_model_dir), "gpus": 1}]
    for name, value in replica_env.items():
        monkeypatch.setenv(name, json.dumps(cascade) if value == "cascade" else value)
    with pytest.raises(ConfigError, match="where the app is built") as caught:
        serve_app.replica_service(args, None, (), built)
    assert "\n" not in str(caught.value)


def test_a_stage_resource_set_only_in_a_replica_refuses_it(tiny_model_dir, larger_model_dir, monkeypatch):
    """A per-stage cascade built with stage 2 on CPUs; a replica whose env gives stage 2 a GPU refuses."""
    cascade = [{"model": str(tiny_model_dir), "rerank_count": 2}, {"model": str(larger_model_dir)}]
    args = {"cascade": cascade, "cascade_layout": "deployment_per_stage"}
    built = app_shape(ServeSettings.load(file_values=args))
    monkeypatch.setenv("RERANK_CASCADE", json.dumps([cascade[0], {**cascade[1], "gpus": 1}]))
    with pytest.raises(ConfigError, match="where the app is built"):
        serve_app.check_shape(ServeSettings.load(file_values=args), built)


def test_stage_resources_ignored_in_one_replica_are_warned_about(tiny_model_dir, larger_model_dir, caplog):
    """cpus/gpus on a stage do nothing when every stage runs in one replica: build_app says so."""
    cascade = [{"model": str(tiny_model_dir), "rerank_count": 2}, {"model": str(larger_model_dir), "gpus": 1}]
    with caplog.at_level("WARNING", logger="ray.serve"):
        serve_app.build_app({"cascade": cascade})
    assert "cpus/gpus of stage(s) stage2 are ignored in cascade_layout one_replica" in caplog.text
