"""Settings: one frozen object per process, composed of sections.

``ModelSettings`` (how to load and run the model) is shared; each program composes it with its own
section (``jobs.settings``, ``serve.settings``). Every setting name has one meaning and one default.
Precedence, highest first: CLI flags (passed as keyword overrides), ``RERANK_*`` environment
variables, the YAML config file (``--config`` / ``RERANK_CONFIG``), then the defaults below.
"""

from __future__ import annotations

import argparse
import json
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Self, Union, get_args, get_origin

import fsspec
import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from reranker.errors import ConfigError
from reranker.types import Activation, Precision

DEFAULT_MODEL = "cross-encoder/ms-marco-TinyBERT-L2-v2"


def read_config_file(path: str) -> dict[str, Any]:
    """Load a flat YAML mapping of setting names to values.

    Args:
        path: Local path or fsspec URI of the YAML file.

    Raises:
        ConfigError: The file is missing, unreadable or not a mapping.

    """
    try:
        with fsspec.open(path, "r") as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting names to values")
    return values


class SettingsSection(BaseSettings):
    """One group of settings: flags (init keywords) beat ``RERANK_*`` env vars, which beat file values."""

    model_config = SettingsConfigDict(env_prefix="RERANK_", frozen=True, extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only flags and env vars; config-file values are merged in by ``load``."""
        return init_settings, env_settings

    @classmethod
    def load(cls, file_values: Mapping[str, Any] | None = None, **overrides: Any) -> Self:
        """Build the section from flags (``None`` ignored), env vars and config-file values.

        Raises:
            ConfigError: A value is invalid; the message names the setting.
        """
        flags = {key: value for key, value in overrides.items() if value is not None}
        try:
            from_env = EnvSettingsSource(cls)()
            return cls(**{**(file_values or {}), **from_env, **flags})
        except pydantic.ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None


class ModelOptions(BaseModel):
    """How to load and run the cross-encoder: plain, validated values that read no environment.

    What ``CrossEncoderModel`` takes; ``ModelSettings`` adds the ``RERANK_*`` sources for programs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="Hugging Face hub id or local directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N.")
    precision: Precision = Field("fp32", description="Weights/compute dtype; fp16 needs a GPU.")
    max_length: int = Field(512, ge=8, description="Max tokens per pair, capped by the model.")
    activation: Activation = Field(
        "none",
        description="Scores as raw logits (none) or sigmoid (a program may define its own).",
    )
    max_batch_tokens: int | None = Field(
        None, ge=64, description="Padded-token budget per forward pass (auto: CPU 4096, GPU 65536)."
    )
    max_batch_pairs: int = Field(
        1024, ge=1, description="Max pairs per model batch (forward passes are cut to it)."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (auto).")
    cls_only_last_layer: bool = Field(
        True,
        description="Run the last layer at [CLS] only (exact, BERT-family; others: full forward).",
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")


class ModelSettings(ModelOptions, SettingsSection):  # type: ignore[misc]  # both configs merge
    """The model's settings section of a program: ``ModelOptions`` from flags, ``RERANK_*`` and files."""


class ComposedSettings(BaseModel):
    """Settings made of sections; one config file (``--config`` / ``RERANK_CONFIG``) feeds them all."""

    model_config = ConfigDict(frozen=True)

    @classmethod
    def sections(cls) -> dict[str, type[SettingsSection]]:
        """Each section's attribute name and class."""
        return {name: field.annotation for name, field in cls.model_fields.items()}  # type: ignore[misc]

    @classmethod
    def load(
        cls, file_values: Mapping[str, Any] | None = None, config_file: str | None = None, **overrides: Any
    ) -> Self:
        """Build every section. Precedence: flags > env vars > config file > ``file_values`` > defaults.

        Args:
            file_values: Values below the config file (e.g. a Serve config's ``args``).
            config_file: YAML file of settings; else ``RERANK_CONFIG``.
            **overrides: Flags; ``None`` means not given.

        Raises:
            ConfigError: Unknown or invalid settings; the message names them.
        """
        path = config_file or os.environ.get("RERANK_CONFIG")
        layered = {**(file_values or {}), **(read_config_file(path) if path else {})}
        sections = cls.sections()
        known = {name for section in sections.values() for name in section.model_fields}
        unknown = sorted(set(layered) - known) + sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} (in {path or 'the given values'})")
        loaded = {
            name: section.load(_pick(layered, section), **_pick(overrides, section))
            for name, section in sections.items()
        }
        try:
            return cls(**loaded)
        except pydantic.ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None


def _pick(values: Mapping[str, Any], section: type[SettingsSection]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if key in section.model_fields}


def describe_validation_error(exc: pydantic.ValidationError) -> str:
    """Pydantic's errors as one line: ``invalid settings: name: problem; ...``."""
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        name = ".".join(str(part) for part in error["loc"])
        problems.append(f"{name}: {message}" if name else message)
    return "invalid settings: " + "; ".join(problems)


def _cli_type(annotation: Any) -> tuple[Any, Sequence[str] | None, bool]:
    """Map a field annotation to (argparse type, choices, is_bool)."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Literal:
        return str, [str(value) for value in get_args(annotation)], False
    if annotation is bool:
        return None, None, True
    if get_origin(annotation) is dict or annotation is dict:
        return json.loads, None, False
    return annotation, None, False


def add_settings_arguments(
    parser: argparse.ArgumentParser, settings_cls: type[BaseSettings] | type[ComposedSettings]
) -> None:
    """Add one ``--flag`` per setting (and ``--config`` for composed settings); unset flags stay unset."""
    if issubclass(settings_cls, ComposedSettings):
        parser.add_argument(
            "--config", dest="config_file", default=None, help="YAML file of settings [env RERANK_CONFIG]"
        )
        for section in settings_cls.sections().values():
            add_settings_arguments(parser, section)
        return
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name, field in settings_cls.model_fields.items():
        kind, choices, is_bool = _cli_type(field.annotation)
        help_text = f"{field.description} [env {prefix}{name.upper()}]"
        flag = "--" + name.replace("_", "-")
        if is_bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)


def overrides_from_args(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The flags the user actually gave, as keyword overrides for ``Settings.load``."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {key: value for key, value in values.items() if value is not None}
