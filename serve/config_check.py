"""Checking a Serve config file before it is deployed: the app's ``args`` and every ``user_config``.

Serve hands a deployment's ``user_config`` to ``reconfigure`` in each replica, after the app is built:
a bad one is found only there, where a replica can at best refuse it (``serve.app.apply_user_config``).
This check finds it before: ``python -m serve`` runs it on its config before starting anything, and
``python -m serve check CONFIG`` runs it alone (for CI, before ``serve deploy``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from reranker.cascade import stage_names
from reranker.errors import ConfigError
from serve.engine import UserConfig
from serve.layout import app_shape, base_batching, own_batching_keys
from serve.settings import ServeSettings

APP_IMPORT_PATH = "serve.app:build_app"
INGRESS = "Reranker"
STAGE_PREFIX = "RerankStage_"


def check_config_file(path: str | Path) -> None:
    """Check every application of a Serve config file that runs this service.

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
    shape = app_shape(settings)
    if deployment == INGRESS:
        if shape["layout"] == "deployment_per_stage" and raw:
            raise ConfigError("the cascade's ingress runs no model: set user_config on the stage deployments")
        _check_stages(settings, raw, names, names)
    elif deployment.startswith(STAGE_PREFIX) and deployment.removeprefix(STAGE_PREFIX) in shape["stages"]:
        stage = deployment.removeprefix(STAGE_PREFIX)
        _check_stages(settings, raw, [stage], [stage])
    else:
        made = [INGRESS, *(STAGE_PREFIX + stage for stage in shape["stages"])]
        raise ConfigError(f"not a deployment of this app (it makes {', '.join(made)})")


def _check_stages(
    settings: ServeSettings, raw: Mapping[str, Any] | None, allowed: Sequence[str], checked: Sequence[str]
) -> None:
    parsed = UserConfig.parse(raw, allowed)
    for name in checked:
        number = stage_names(settings.stages).index(name)
        parsed.for_stage(base_batching(settings, number), name, own_batching_keys(settings, name))
