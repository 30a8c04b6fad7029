"""The Ray Serve deployment: one model per replica behind the FastAPI routes.

``serve run configs/serve.yaml`` imports ``serve.app:build_app`` with the config's ``args``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from reranker.model import CrossEncoderModel
from reranker.settings import ModelSettings, ServeSettings
from serve.api import RerankService, create_api
from serve.engine import BatchingConfig, RerankEngine
from serve.metrics import RerankMetrics

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
    model = CrossEncoderModel(settings.model.model_copy(update={"torch_threads": threads}))
    model.score(["warm up"] * 8, ["the model before the first request"] * 8)
    return RerankService(settings, RerankEngine(model, batching_config(settings), metrics), metrics)


@serve.deployment(name="Reranker", ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(api)
class Reranker:
    """Loads the model once, warms it up, and serves the rerank routes."""

    def __init__(self, settings: ServeSettings) -> None:
        threads = replica_threads(settings.model)
        self.service = build_service(settings, threads, RerankMetrics())
        logger.info("Reranker ready: %s, %d torch threads", settings.model.model, threads)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching settings from ``user_config`` without a redeploy.

        Raises:
            ConfigError: An unknown key or invalid value (Serve then keeps the old config).
        """
        engine = self.service.engine
        engine.configure(engine.batching.updated(user_config))

    async def check_health(self) -> None:
        """Serve's health check: fails when the model can't score."""
        await self.service.engine.health_check()


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files; ``args`` sit below env vars in precedence."""
    return Reranker.bind(ServeSettings.load(file_values=args))  # type: ignore[attr-defined]
