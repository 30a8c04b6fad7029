"""The app's shape and each stage's batching, from the service's settings (no Ray, no model).

``serve.app`` builds the deployments from these and each replica checks them; ``serve.config_check``
uses them to check a Serve config before it is deployed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from reranker.cascade import stage_names
from reranker.errors import ConfigError
from reranker.settings import ModelOptions
from serve.engine import BatchingConfig, BatchingOverrides
from serve.settings import ServeSettings

logger = logging.getLogger("ray.serve")


def batching_config(settings: ServeSettings, stage: ModelOptions | None = None) -> BatchingConfig:
    """A replica's starting batching knobs, from its settings (a cascade stage's own max_batch_pairs)."""
    return BatchingConfig(
        max_batch_pairs=(stage or settings.model).max_batch_pairs,
        batch_wait_timeout_s=settings.serving.batch_wait_timeout_s,
        max_pending_pairs=settings.serving.max_pending_pairs,
    )


def base_batching(settings: ServeSettings, number: int) -> BatchingConfig:
    """Stage ``number``'s batching from its settings: what a ``user_config``'s keys apply on top of."""
    return batching_config(settings, settings.stages[number])


def app_shape(settings: ServeSettings) -> dict[str, Any]:
    """The deployments the settings make: the layout, and a cascade's stages with their resources.

    Compared between the build and each replica (``check_shape``), so a cascade, a layout or a stage's
    ``cpus`` / ``gpus`` set only in the replicas' env, which the build never saw, is refused.
    """
    per_stage = bool(settings.cascade.cascade) and settings.serving.cascade_layout == "deployment_per_stage"
    stages = [
        {"name": name, "cpus": stage.cpus, "gpus": stage.gpus}
        for name, stage in zip(stage_names(settings.stages), settings.stages, strict=True)
    ]
    return {
        "layout": "deployment_per_stage" if per_stage else "one_replica",
        "stages": stages if settings.cascade.cascade else [],
    }


def stage_deployments(shape: Mapping[str, Any]) -> list[str]:
    """The stage names that have a deployment of their own in this shape (none in one_replica)."""
    return [stage["name"] for stage in shape["stages"]] if shape["layout"] == "deployment_per_stage" else []


def check_shape(settings: ServeSettings, built: Mapping[str, Any] | None) -> None:
    """Refuse a replica whose own settings make another app than the one that was built.

    Raises:
        ConfigError: One line: the cascade or its layout differs from the build's (e.g. set only in
            a worker pod's env, which the build never saw).
    """
    if built is not None and app_shape(settings) != dict(built):
        raise ConfigError(
            f"this replica's settings make {app_shape(settings)} but the app was built as {dict(built)}: "
            "set cascade (with each stage's cpus/gpus) and cascade_layout where the app is built (the Serve "
            "config's args, or the env of the process that builds it), not only in the replicas' env"
        )


def warn_ignored_resources(settings: ServeSettings) -> None:
    """Log once that a cascade stage's cpus / gpus do nothing in the one_replica layout."""
    if app_shape(settings)["layout"] != "one_replica":
        return
    named = [name for name, stage in zip(stage_names(settings.stages), settings.stages, strict=True)
             if stage.cpus is not None or stage.gpus is not None]  # fmt: skip
    if named and settings.cascade.cascade:
        logger.warning(
            "cascade: cpus/gpus of stage(s) %s are ignored in cascade_layout one_replica (every stage runs "
            "in the Reranker replica, with its ray_actor_options); use deployment_per_stage to give a stage "
            "resources of its own",
            ", ".join(named),
        )


def own_batching_keys(settings: ServeSettings, name: str) -> set[str]:
    """The batching keys stage ``name``'s cascade declaration sets itself.

    A top-level ``user_config`` key then leaves that stage alone (its ``stages`` entry still applies).
    """
    declared = dict(zip(stage_names(settings.stages), settings.cascade.cascade, strict=False))
    stage = declared.get(name)
    return set() if stage is None else stage.model_fields_set & set(BatchingOverrides.model_fields)
