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
from reranker.settings import ServeSettings
from serve.api import create_api, make_service
from serve.engine import RerankEngine
from serve.metrics import RerankMetrics

logger = logging.getLogger("ray.serve")
api = create_api()
BATCH_KEYS = ("max_batch_pairs", "batch_wait_timeout_s", "max_pending_pairs")


def replica_threads(settings: ServeSettings) -> int:
    """Torch threads: the setting, else the CPUs Ray assigned this replica (never fewer than 1)."""
    if settings.torch_threads:
        return settings.torch_threads
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.ceil(assigned))


@serve.deployment(name="Reranker", ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(api)
class Reranker:
    """Loads the model once, warms it up, and serves the rerank routes."""

    def __init__(self, settings: ServeSettings) -> None:
        threads = replica_threads(settings)
        model_settings = settings.model_copy(update={"activation": "none", "torch_threads": threads})
        self.settings = settings
        self.engine = RerankEngine(CrossEncoderModel(model_settings), RerankMetrics())
        self.engine.configure(
            settings.max_batch_pairs, settings.batch_wait_timeout_s, settings.max_pending_pairs
        )
        self.engine.model.score(["warm up"] * 8, ["the model before the first request"] * 8)
        self.service = make_service(settings, self.engine, self.engine.metrics)
        logger.info("Reranker ready: %s, %d torch threads", settings.model, threads)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching settings from ``user_config`` without a redeploy."""
        unknown = set(user_config) - set(BATCH_KEYS)
        if unknown:
            raise ValueError(f"unknown user_config keys: {sorted(unknown)}; allowed: {BATCH_KEYS}")
        values = {key: user_config.get(key, getattr(self.settings, key)) for key in BATCH_KEYS}
        self.engine.configure(**values)

    async def check_health(self) -> None:
        """Serve's health check: fails when the model can't score."""
        await self.engine.health_check()


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files; ``args`` sit below env vars in precedence."""
    return Reranker.bind(ServeSettings.load(file_values=args))  # type: ignore[attr-defined]
