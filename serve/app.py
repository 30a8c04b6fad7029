"""The Ray Serve deployment: one model per replica behind the FastAPI routes.

``serve run configs/serve.yaml`` imports ``serve.app:build_app`` with the config's ``args``. Settings
are resolved in each replica, from its own environment (``RERANK_*`` in the pod, the node or
``runtime_env.env_vars``) over the ``args``: what a replica enforces is what its environment says.
The app's shape (one deployment, or one per cascade stage) is decided where the app is built, so each
replica checks that its own settings make the same shape and refuses to start otherwise.
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
from reranker.errors import ConfigError
from reranker.settings import ModelSettings
from serve.api import create_api
from serve.cascade import RemoteStage
from serve.core import RerankService
from serve.engine import RerankEngine, Scored, Truncation, UserConfig
from serve.metrics import RerankMetrics
from serve.settings import ServeSettings
from serve.shape import (
    app_shape,
    base_batching,
    check_shape,
    own_batching_keys,
    stage_deployments,
    warn_ignored_resources,
)

logger = logging.getLogger("ray.serve")
api = create_api()


def replica_threads(settings: ModelSettings) -> int:
    """Torch threads: the setting, else the CPUs Ray assigned this replica (never fewer than 1)."""
    if settings.torch_threads:
        return settings.torch_threads
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.ceil(assigned))


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
        base_batching(settings, number),
        metrics,
        health_interval_s=settings.serving.health_probe_interval_s,
        stage=stage_names(settings.stages)[number],
    )


def build_service(settings: ServeSettings, threads: int, metrics: RerankMetrics | None) -> RerankService:
    """Every stage's model in this replica (one without a cascade), wrapped in the routes' service."""
    engines = [build_engine(settings, number, threads, metrics) for number in range(len(settings.stages))]
    return RerankService(settings, engines, metrics)


def replica_service(
    args: Mapping[str, Any] | None,
    metrics: RerankMetrics | None,
    stage_handles: Sequence[Any] = (),
    built: Mapping[str, Any] | None = None,
) -> RerankService:
    """The replica's service, its settings resolved in this process: ``RERANK_*`` env over ``args``.

    With ``stage_handles`` (``cascade_layout: deployment_per_stage``), the stages are other deployments
    and this replica loads no model.

    Raises:
        ConfigError: The settings are invalid, or make another app than ``built`` (the build's shape).
    """
    settings = ServeSettings.load(file_values=args)
    check_shape(settings, built)
    warn_ignored_resources(settings)
    if stage_handles:
        stages = [
            RemoteStage(handle, stage.max_length, name)
            for handle, stage, name in zip(
                stage_handles, settings.stages, stage_names(settings.stages), strict=True
            )
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


def apply_user_config(
    engines: Sequence[RerankEngine],
    raw: Mapping[str, Any] | None,
    names: Sequence[str],
    settings: ServeSettings | None,
) -> None:
    """Apply a ``user_config`` to every engine, or to none: a refused one keeps the settings in force.

    ``settings`` (a replica running every stage): a stage whose cascade declaration sets a key itself
    keeps it against a top-level key; None (a stage's own deployment): every key applies.

    Never raises (Serve stops a replica whose ``reconfigure`` raises, and its replacements would fail
    the same way): a refusal is logged, counted and shown on ``/health``.
    """
    try:
        parsed = UserConfig.parse(raw, names)
        configs = [
            parsed.for_stage(e.base, e.stage, own_batching_keys(settings, e.stage) if settings else ())
            for e in engines
        ]
    except ConfigError as exc:
        for engine in engines:
            engine.refuse_config(str(exc))
        return
    for engine, config in zip(engines, configs, strict=True):
        engine.configure(config)
        engine.config_refused = None
        logger.info("stage %s batching: %s", engine.stage, config.model_dump())


def local_engines(service: RerankService) -> list[RerankEngine]:
    """The engines this replica runs itself (none when its stages are other deployments)."""
    return [stage for stage in service.stages if isinstance(stage, RerankEngine)]


@serve.deployment(name="Reranker", ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress(api)
class Reranker:
    """Loads the model (or every stage of a cascade) once, warms it up, and serves the rerank routes."""

    def __init__(
        self,
        args: Mapping[str, Any] | None = None,
        stage_handles: Sequence[Any] = (),
        built: Mapping[str, Any] | None = None,
    ) -> None:
        """Resolve the settings here, in the replica (its env over ``args``), then load the model.

        The settings must make the app's shape as it was ``built`` (else the replica refuses to start).
        """
        self.service = replica_service(args, RerankMetrics(), stage_handles, built)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching settings from ``user_config`` without a redeploy, on the replica's event loop.

        Async, so Serve runs it on the loop that serves requests: the change is atomic for them. It
        applies to every stage this replica runs (stage deployments take their own ``user_config``);
        keys it leaves out keep their settings. A refused one changes nothing and is reported.
        """
        engines = local_engines(self.service)
        if not engines and user_config:
            logger.warning("user_config of the cascade's ingress ignored: set it on the RerankStage_<name> "
                           "deployments, which run the models")  # fmt: skip
        names = stage_names(self.service.settings.stages)
        apply_user_config(engines, user_config, names, self.service.settings)

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

    def __init__(
        self, args: Mapping[str, Any] | None, number: int, built: Mapping[str, Any] | None = None
    ) -> None:
        """Resolve the settings in the replica, check the app's shape, and load stage ``number``'s model."""
        self.settings = ServeSettings.load(file_values=args)
        check_shape(self.settings, built)
        threads = replica_threads(self.settings.model)
        self.engine = build_engine(self.settings, number, threads, RerankMetrics())
        logger.info("RerankStage %s ready: %s", self.engine.stage, self.settings.stages[number].model)

    async def score(
        self, queries: list[str], passages: list[str], truncation: Truncation, instruction: str | None = None
    ) -> Scored:
        """Raw logits of the pairs, through this stage's batching queue."""
        return await self.engine.score(queries, passages, truncation, instruction)

    async def accepts_instruction(self) -> bool:
        """Whether this stage's model takes an instruction (the ingress asks once)."""
        return await self.engine.accepts_instruction()

    async def kind(self) -> str:
        """What kind of reranker this stage's model is (for the ingress's ``/v1/models``)."""
        return await self.engine.kind()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply this stage deployment's ``user_config`` (its own: every key applies to this stage)."""
        apply_user_config([self.engine], user_config, [self.engine.stage], None)

    async def check_health(self) -> None:
        """Serve's health check: fails when the stage's model can't score."""
        await self.engine.health_check()

    async def health(self) -> str | None:
        """The ingress's check of this stage: raise unless it can score; its refused ``user_config``."""
        return await self.engine.health_check()

    def batching(self) -> dict[str, Any]:
        """The batching settings in force (for operators, through a deployment handle)."""
        return self.engine.batching.model_dump()


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files; ``args`` sit below each replica's env vars.

    The args are checked here (a bad value fails ``serve run`` / ``serve deploy`` at once) and
    resolved again in every replica, so a replica's own environment applies; the app's shape decided
    here (the cascade and its layout) is handed to every replica, which refuses to start if its own
    settings make another. A cascade with ``cascade_layout: deployment_per_stage`` becomes one
    ``RerankStage_<name>`` deployment per stage (configurable by that name in the Serve config) behind
    the ``Reranker`` ingress.
    """
    settings = ServeSettings.load(file_values=args)
    shape = app_shape(settings)
    warn_ignored_resources(settings)
    if not stage_deployments(shape):
        return Reranker.bind(dict(args), (), shape)  # type: ignore[attr-defined]
    handles = [
        RerankStage.options(  # type: ignore[attr-defined]
            name=f"RerankStage_{name}", ray_actor_options=stage_resources(stage)
        ).bind(dict(args), number, shape)
        for number, (name, stage) in enumerate(
            zip(stage_names(settings.stages), settings.stages, strict=True)
        )
    ]
    return Reranker.options(ray_actor_options={"num_cpus": 0.5}).bind(dict(args), handles, shape)  # type: ignore[attr-defined]


def stage_resources(stage: CascadeStage) -> dict[str, float]:
    """A stage deployment's default actor options, from the stage's cpus / gpus (the config may override)."""
    return {"num_cpus": stage.cpus if stage.cpus is not None else 1.0, "num_gpus": stage.gpus or 0.0}
