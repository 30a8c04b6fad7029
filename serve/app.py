"""The Ray Serve deployment: one model per replica behind the FastAPI routes.

``serve run configs/serve.yaml`` imports ``serve.app:build_app`` with the config's ``args``. Settings
are resolved in each replica, from its own environment (``RERANK_*`` in the pod, the node or
``runtime_env.env_vars``) over the ``args``: what a replica enforces is what its environment says.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from reranker.model import CrossEncoderModel
from reranker.settings import ModelSettings
from serve.api import RerankService, create_api
from serve.engine import BatchingConfig, RerankEngine
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


def batching_config(settings: ServeSettings) -> BatchingConfig:
    """The replica's starting batching knobs, from its settings."""
    return BatchingConfig(
        max_batch_pairs=settings.model.max_batch_pairs,
        batch_wait_timeout_s=settings.serving.batch_wait_timeout_s,
        max_pending_pairs=settings.serving.max_pending_pairs,
    )


def build_service(settings: ServeSettings, threads: int, metrics: RerankMetrics | None) -> RerankService:
    """Load and warm the model, and wrap it in the engine and the routes' service."""
    model = CrossEncoderModel.from_settings(settings.model.model_copy(update={"torch_threads": threads}))
    model.score(["warm up"] * 8, ["the model before the first request"] * 8)
    engine = RerankEngine(
        model, batching_config(settings), metrics, health_interval_s=settings.serving.health_probe_interval_s
    )
    return RerankService(settings, engine, metrics)


def replica_service(args: Mapping[str, Any] | None, metrics: RerankMetrics | None) -> RerankService:
    """The replica's service, its settings resolved in this process: ``RERANK_*`` env over ``args``."""
    settings = ServeSettings.load(file_values=args)
    threads = replica_threads(settings.model)
    service = build_service(settings, threads, metrics)
    logger.info(
        "Reranker ready: %s, %d torch threads, API key %s",
        settings.model.model,
        threads,
        "required" if settings.serving.api_key else "not set",
    )
    return service


@serve.deployment(name="Reranker", ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(api)
class Reranker:
    """Loads the model once, warms it up, and serves the rerank routes."""

    def __init__(self, args: Mapping[str, Any] | None = None) -> None:
        """Resolve the settings here, in the replica (its env over ``args``), then load the model."""
        self.service = replica_service(args, RerankMetrics())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching settings from ``user_config`` without a redeploy, on the replica's event loop.

        Async, so Serve runs it on the loop that serves requests: the change is atomic for them.

        Raises:
            ConfigError: An unknown key or invalid value (Serve then keeps the old config).
        """
        engine = self.service.engine
        engine.configure(engine.batching.updated(user_config))

    async def check_health(self) -> None:
        """Serve's health check: fails when the model can't score."""
        await self.service.engine.health_check()

    def batching(self) -> dict[str, Any]:
        """The batching settings in force (for operators, through a deployment handle)."""
        return self.service.engine.batching.model_dump()


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files; ``args`` sit below each replica's env vars.

    The args are checked here (a bad value fails ``serve run`` / ``serve deploy`` at once) and
    resolved again in every replica, so a replica's own environment applies.
    """
    ServeSettings.load(file_values=args)
    return Reranker.bind(dict(args))  # type: ignore[attr-defined]
