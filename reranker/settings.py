"""Settings: one frozen object per process, composed of sections.

``ModelSettings`` (how to load and run the model) is shared; each program composes it with its own
section (``jobs.settings``, ``serve.settings``). Every setting name has one meaning and one default.
Precedence, highest first: CLI flags (passed as keyword overrides), ``RERANK_*`` environment
variables, the YAML config file (``--config`` / ``RERANK_CONFIG``), then the defaults below.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, Self

import fsspec
import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from reranker.errors import ConfigError
from reranker.types import Activation, Precision

DEFAULT_MODEL = "cross-encoder/ms-marco-TinyBERT-L2-v2"
logger = logging.getLogger(__name__)


def read_config_file(path: str) -> dict[str, Any]:
    """Load a flat YAML mapping of setting names to values.

    Not pydantic-settings' ``YamlConfigSettingsSource``: that one reads local paths only (a RayJob's config
    may sit on ``s3://``) and skips a missing file silently, where a named file that is missing is an error.

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
    instruction: str | None = Field(
        None,
        description="Task description for rerankers that take one (LLM rerankers' system prompt); default: "
        "the model's own default.",
    )
    true_token: str | None = Field(
        None, description="LLM rerankers: the token whose logit means relevant (default: the model's; yes)."
    )
    false_token: str | None = Field(
        None, description="LLM rerankers: the token whose logit means irrelevant (default: the model's; no)."
    )
    max_chunks_per_doc: int = Field(
        1,
        ge=1,
        le=1000,
        description="Passages longer than a pair holds: 1 cuts them to fit; N scores up to N overlapping "
        "windows and keeps the best (Cohere's chunking).",
    )
    chunk_overlap_tokens: int = Field(
        32, ge=0, description="Tokens each window shares with the previous one (at most half a window)."
    )


class ModelSettings(ModelOptions, SettingsSection):  # type: ignore[misc]  # both configs merge
    """The model's settings section of a program: ``ModelOptions`` from flags, ``RERANK_*`` and files."""


ENV_PREFIX = "RERANK_"
CONFIG_ENV = "RERANK_CONFIG"
_warned_env: set[str] = set()


def warn_unknown_env(known: Collection[str], program: str, environ: Mapping[str, str] = os.environ) -> None:
    """Log a warning, once per process and name, for each ``RERANK_*`` variable that is no setting here.

    A typo (``RERANK_APIKEY``) would otherwise be ignored without a word; ``RERANK_EVAL_*`` belongs to
    the evaluation job.
    """
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name.startswith("RERANK_EVAL_"):
            continue
        if name in known or name in _warned_env:
            continue
        _warned_env.add(name)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        logger.warning("%s is not a setting of %s and is ignored%s", name, program, hint)


class ComposedSettings(BaseModel):
    """Settings made of sections; one config file (``--config`` / ``RERANK_CONFIG``) feeds them all."""

    model_config = ConfigDict(frozen=True)
    other_env: ClassVar[frozenset[str]] = frozenset()  # RERANK_* names the program reads elsewhere

    @classmethod
    def env_names(cls) -> set[str]:
        """Every ``RERANK_*`` variable this program reads."""
        fields = {name for section in cls.sections().values() for name in section.model_fields}
        return {f"{ENV_PREFIX}{name.upper()}" for name in fields} | {CONFIG_ENV} | set(cls.other_env)

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
        warn_unknown_env(cls.env_names(), cls.__name__)
        path = config_file or os.environ.get(CONFIG_ENV)
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


CLI_OPTIONS: dict[str, Any] = {  # pydantic-settings' CLI source: --kebab-case flags, --x/--no-x for bools
    "cli_kebab_case": True,
    "cli_implicit_flags": True,
    "cli_hide_none_type": True,
    "cli_show_env_vars": True,
}


def parse_flags(
    settings_cls: type[SettingsSection] | type[ComposedSettings],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str,
) -> dict[str, Any]:
    """The flags the user gave (one per setting, plus ``--config``), as keyword overrides for ``load``.

    Each section's flags come from pydantic-settings' ``CliSettingsSource``, all on one parser, so
    ``--help`` lists every setting with its default and env variable; unset flags stay unset.

    Raises:
        ConfigError: A flag's value can't be parsed (e.g. bad JSON for a mapping).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if issubclass(settings_cls, ComposedSettings):
        parser.add_argument(
            "--config", dest="config_file", metavar="FILE", help="YAML file of settings [env: RERANK_CONFIG]"
        )
        sections = list(settings_cls.sections().values())
    else:
        sections = [settings_cls]
    sources: list[CliSettingsSource[Any]] = [
        CliSettingsSource(section, root_parser=parser, **CLI_OPTIONS) for section in sections
    ]
    namespace = parser.parse_args(argv)
    try:
        flags = {key: value for source in sources for key, value in source(parsed_args=namespace)().items()}
    except SettingsError as exc:
        raise ConfigError(f"invalid flag: {exc}") from None
    config_file = getattr(namespace, "config_file", None)
    return {**flags, "config_file": config_file} if config_file else flags
