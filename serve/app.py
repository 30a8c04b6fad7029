"""The Ray Serve deployment: one model per replica behind the FastAPI routes.

``serve run configs/serve.yaml`` imports ``serve.app:build_app`` with the config's ``args``. Settings
are resolved in each replica, from its own environment (``RERANK_*`` in the pod, the node or
``runtime_env.env_vars``) over the ``args``: what a replica enforces is what its environment says.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from reranker.cascade import CascadeStage, model_options, stage_names
from reranker.settings import ModelOptions, ModelSettings
from serve.api import RerankService, create_api
from serve.cascade import RemoteStage
from serve.engine import BatchingConfig, RerankEngine, Scored, Truncation
from serve.metrics import RerankMetrics
from serve.settings import ServeSettings

logger = logging.getLogger("ray.serve")
api = create_api()


def replica_threads(settings: ModelSettings) -> int:
    """Torch threads: the setting, else the CPUs Ray assigned this replica (never fewer than 1)."""
    if settings.torch_threads:
        return settings.torch_threads
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.ceil(assigned))


def batching_config(settings: ServeSettings, stage: ModelOptions | None = None) -> BatchingConfig:
    """A replica's starting batching knobs, from its settings (a cascade stage's own max_batch_pairs)."""
    return BatchingConfig(
        max_batch_pairs=(stage or settings.model).max_batch_pairs,
        batch_wait_timeout_s=settings.serving.batch_wait_timeout_s,
        max_pending_pairs=settings.serving.max_pending_pairs,
    )


def build_engine(
    settings: ServeSettings, number: int, threads: int, metrics: RerankMetrics | None
) -> RerankEngine:
    """Load and warm stage ``number``'s model (the only one without a cascade) behind its own engine."""
    from reranker.model import CrossEncoderModel  # here: building the app (on the driver) needs no torch

    stage = settings.stages[number]
    options = model_options(stage).model_copy(update={"torch_threads": stage.torch_threads or threads})
    model = CrossEncoderModel.from_settings(options)
    model.score(["warm up"] * 8, ["the model before the first request"] * 8)
    return RerankEngine(
        model,
        batching_config(settings, stage),
        metrics,
        health_interval_s=settings.serving.health_probe_interval_s,
        stage=stage_names(settings.stages)[number],
    )


def build_service(settings: ServeSettings, threads: int, metrics: RerankMetrics | None) -> RerankService:
    """Every stage's model in this replica (one without a cascade), wrapped in the routes' service."""
    engines = [build_engine(settings, number, threads, metrics) for number in range(len(settings.stages))]
    return RerankService(settings, engines, metrics)


def replica_service(
    args: Mapping[str, Any] | None, metrics: RerankMetrics | None, stage_handles: Sequence[Any] = ()
) -> RerankService:
    """The replica's service, its settings resolved in this process: ``RERANK_*`` env over ``args``.

    With ``stage_handles`` (``cascade_layout: deployment_per_stage``), the stages are other deployments
    and this replica loads no model.
    """
    settings = ServeSettings.load(file_values=args)
    if stage_handles:
        stages = [
            RemoteStage(handle, stage.max_length)
            for handle, stage in zip(stage_handles, settings.stages, strict=True)
        ]
        logger.info("Reranker ready: cascade of %d stage deployments", len(stages))
        return RerankService(settings, stages, metrics)
    threads = replica_threads(settings.model)
    service = build_service(settings, threads, metrics)
    logger.info(
        "Reranker ready: %s, %d torch threads, API key %s",
        " -> ".join(stage.model for stage in settings.stages),
        threads,
        "required" if settings.serving.api_key else "not set",
    )
    return service


def local_engines(service: RerankService) -> list[RerankEngine]:
    """The engines this replica runs itself (none when its stages are other deployments)."""
    return [stage for stage in service.stages if isinstance(stage, RerankEngine)]


@serve.deployment(name="Reranker", ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(api)
class Reranker:
    """Loads the model (or every stage of a cascade) once, warms it up, and serves the rerank routes."""

    def __init__(self, args: Mapping[str, Any] | None = None, stage_handles: Sequence[Any] = ()) -> None:
        """Resolve the settings here, in the replica (its env over ``args``), then load the model."""
        self.service = replica_service(args, RerankMetrics(), stage_handles)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching settings from ``user_config`` without a redeploy, on the replica's event loop.

        Async, so Serve runs it on the loop that serves requests: the change is atomic for them. It
        applies to every stage this replica runs (stage deployments take their own ``user_config``).

        Raises:
            ConfigError: An unknown key or invalid value (Serve then keeps the old config).
        """
        for engine in local_engines(self.service):
            engine.configure(engine.batching.updated(user_config))

    async def check_health(self) -> None:
        """Serve's health check: fails when the model (every stage this replica runs) can't score."""
        for engine in local_engines(self.service):
            await engine.health_check()

    def batching(self) -> dict[str, Any]:
        """The batching settings in force (for operators, through a deployment handle)."""
        return self.service.engine.batching.model_dump()  # type: ignore[attr-defined]


@serve.deployment(name="RerankStage", ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
class RerankStage:
    """One stage of a cascade as its own deployment: its model, engine, batching and autoscaling."""

    def __init__(self, args: Mapping[str, Any] | None, number: int) -> None:
        """Resolve the settings in the replica and load stage ``number``'s model."""
        settings = ServeSettings.load(file_values=args)
        threads = replica_threads(settings.model)
        self.engine = build_engine(settings, number, threads, RerankMetrics())
        logger.info("RerankStage %s ready: %s", self.engine.stage, settings.stages[number].model)

    async def score(self, queries: list[str], passages: list[str], truncation: Truncation) -> Scored:
        """Raw logits of the pairs, through this stage's batching queue."""
        return await self.engine.score(queries, passages, truncation)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply this stage's batching settings from ``user_config`` on the replica's event loop."""
        self.engine.configure(self.engine.batching.updated(user_config))

    async def check_health(self) -> None:
        """Serve's health check: fails when the stage's model can't score."""
        await self.engine.health_check()


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files; ``args`` sit below each replica's env vars.

    The args are checked here (a bad value fails ``serve run`` / ``serve deploy`` at once) and
    resolved again in every replica, so a replica's own environment applies. A cascade with
    ``cascade_layout: deployment_per_stage`` becomes one ``RerankStage_<name>`` deployment per stage
    (configurable by that name in the Serve config) behind the ``Reranker`` ingress.
    """
    settings = ServeSettings.load(file_values=args)
    if not settings.cascade.cascade or settings.serving.cascade_layout == "one_replica":
        return Reranker.bind(dict(args))  # type: ignore[attr-defined]
    handles = [
        RerankStage.options(  # type: ignore[attr-defined]
            name=f"RerankStage_{name}", ray_actor_options=stage_resources(stage)
        ).bind(dict(args), number)
        for number, (name, stage) in enumerate(
            zip(stage_names(settings.stages), settings.stages, strict=True)
        )
    ]
    return Reranker.options(ray_actor_options={"num_cpus": 0.5}).bind(dict(args), handles)  # type: ignore[attr-defined]


def stage_resources(stage: CascadeStage) -> dict[str, float]:
    """A stage deployment's default actor options, from the stage's cpus / gpus (the config may override)."""
    return {"num_cpus": stage.cpus if stage.cpus is not None else 1.0, "num_gpus": stage.gpus or 0.0}
