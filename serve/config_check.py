"""Checking a Serve config file before it is deployed: the app's ``args`` and every ``user_config``.

Serve hands a deployment's ``user_config`` to ``reconfigure`` in each replica, after the app is built:
a bad one is found only there, where a replica can at best refuse it (``serve.app.apply_user_config``).
This check finds it before: ``python -m serve`` runs it on its config before starting anything, and
``python -m serve check CONFIG`` runs it alone (for CI, before ``serve deploy``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from reranker.cascade import stage_names
from reranker.errors import ConfigError
from serve.engine import UserConfig
from serve.settings import DEFAULT_BUFFER_BYTES, PROXY_BUFFER_ENV, ServeSettings
from serve.shape import app_shape, base_batching, own_batching_keys, stage_deployments

APP_IMPORT_PATH = "serve.app:build_app"
INGRESS = "Reranker"
STAGE_PREFIX = "RerankStage_"


def smallest_max_body_bytes(config: Mapping[str, Any]) -> int | None:
    """The lowest ``max_body_bytes`` of this service's applications in a Serve config (None: none)."""
    limits = [
        ServeSettings.load(file_values=application.get("args") or {}).serving.max_body_bytes
        for application in config.get("applications") or []
        if application.get("import_path") == APP_IMPORT_PATH
    ]
    return min(limits, default=None)


def proxy_buffer_warning(config: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> str | None:
    """A warning when the proxy's retry buffer (its env, else 1 MiB) can hold more than ``max_body_bytes``.

    The proxy reads its cap from the environment that starts Ray, never from a Serve config's args.
    """
    limit = smallest_max_body_bytes(config)
    buffer = environ.get(PROXY_BUFFER_ENV, "").strip()
    cap = int(buffer) if buffer.isdigit() else DEFAULT_BUFFER_BYTES
    if limit is None or cap <= limit:
        return None
    return (
        f"max_body_bytes {limit} is below the proxy's retry buffer ({cap} bytes): set "
        f"{PROXY_BUFFER_ENV}={limit} in the environment that starts Ray on every node (python -m serve does "
        "it itself)"
    )


def check_config_file(path: str | Path) -> dict[str, Any]:
    """Check every application of a Serve config file that runs this service; the config.

    Raises:
        ConfigError: One line naming the application, the deployment and the problem.
    """
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read Serve config {path}: {exc}") from None
    for application in config.get("applications") or []:
        if application.get("import_path") == APP_IMPORT_PATH:
            check_application(application)
    return dict(config)


def check_application(application: Mapping[str, Any]) -> None:
    """Check one application's ``args`` (as ``build_app`` does) and its deployments' ``user_config``.

    Raises:
        ConfigError: The args or a ``user_config`` are invalid, or a deployment name is not one the
            app makes; the message names the application and deployment.
    """
    name = application.get("name", "default")
    try:
        settings = ServeSettings.load(file_values=application.get("args") or {})
    except ConfigError as exc:
        raise ConfigError(f"application {name!r}: args: {exc}") from None
    for deployment in application.get("deployments") or []:
        try:
            check_user_config(settings, deployment.get("name", ""), deployment.get("user_config"))
        except ConfigError as exc:
            raise ConfigError(f"application {name!r}, deployment {deployment.get('name')!r}: {exc}") from None


def check_user_config(settings: ServeSettings, deployment: str, raw: Mapping[str, Any] | None) -> None:
    """Check a deployment's ``user_config`` as its replicas would apply it, stage by stage.

    Raises:
        ConfigError: Invalid, or for a deployment this app does not make.
    """
    names = stage_names(settings.stages)
    separate = stage_deployments(app_shape(settings))
    if deployment == INGRESS:
        if separate and raw:
            raise ConfigError("the cascade's ingress runs no model: set user_config on the stage deployments")
        _check_stages(settings, raw, names, names, own=True)
    elif deployment.removeprefix(STAGE_PREFIX) in separate and deployment.startswith(STAGE_PREFIX):
        stage = deployment.removeprefix(STAGE_PREFIX)
        _check_stages(settings, raw, [stage], [stage], own=False)
    else:
        made = [INGRESS, *(STAGE_PREFIX + stage for stage in separate)]
        raise ConfigError(f"not a deployment of this app (it makes {', '.join(made)})")


def _check_stages(
    settings: ServeSettings,
    raw: Mapping[str, Any] | None,
    allowed: Sequence[str],
    checked: Sequence[str],
    own: bool,
) -> None:
    """Validate ``raw`` and apply it to each checked stage's settings, as its replicas will.

    ``own``: a stage's own cascade declaration keeps its keys against top-level ones (the ingress of a
    one-replica cascade); a stage deployment's own ``user_config`` applies every key.
    """
    parsed = UserConfig.parse(raw, allowed)
    names = stage_names(settings.stages)
    for name in checked:
        keep = own_batching_keys(settings, name) if own else set()
        parsed.for_stage(base_batching(settings, names.index(name)), name, keep)
