"""Settings: one frozen object per process, composed of sections.

``ModelSettings`` (how to load and run the model) is shared; the job adds ``JobSettings`` and the
service ``ServingSettings``. Every setting name has one meaning and one default, written here.
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
from pydantic import BaseModel, ConfigDict, Field, model_validator
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
        description="Job scores: raw logits (none) or sigmoid. Not for the service (its APIs define theirs).",
    )
    max_batch_tokens: int | None = Field(
        None, ge=64, description="Padded-token budget per forward pass (auto: CPU 4096, GPU 65536)."
    )
    max_batch_pairs: int = Field(
        1024, ge=1, description="Max pairs per model batch (the service coalesces requests up to it)."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (auto).")
    cls_only_last_layer: bool = Field(
        True,
        description="Run the last layer at [CLS] only (exact, BERT-family; others: full forward).",
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")


class ModelSettings(ModelOptions, SettingsSection):  # type: ignore[misc]  # both configs merge
    """The model's settings section of a program: ``ModelOptions`` from flags, ``RERANK_*`` and files."""


class JobSettings(SettingsSection):
    """What the offline rescoring job reads and writes, and how it sizes its actor pool."""

    input: str | None = Field(None, description="Parquet file, directory or glob (any fsspec URI).")
    output: str | None = Field(None, description="Output Parquet dataset directory (fsspec URI).")
    query_column: str = Field("query", description="Column holding the query text.")
    passage_column: str = Field("passage", description="Column holding the passage text.")
    score_column: str = Field("score", description="Name of the float32 score column to add.")
    group_column: str | None = Field(None, description="Query-id column for --rank / --top-k.")
    rank: bool = Field(False, description="Add a 1-based 'rank' column within each group.")
    top_k: int | None = Field(None, ge=1, description="Keep only the k best rows of each group.")
    rows_per_unit: int = Field(
        50_000, ge=1, description="Rows per work unit: the grain of scoring, commit and resume."
    )
    on_bad_file: Literal["fail", "skip"] = Field(
        "fail",
        description="An unreadable input file stops the job (fail) or is left out and reported (skip).",
    )
    num_actors: int | None = Field(None, ge=1, description="Scoring actors (auto from cluster).")
    cpus_per_actor: float | None = Field(None, gt=0, description="CPUs per actor (auto).")
    gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per actor (auto: 1 if GPUs).")
    io_cpus: float = Field(
        1.0, gt=0, description="CPUs per read/write task, left unreserved by actors on each node."
    )
    object_store_mib: int | None = Field(
        None,
        ge=64,
        description="Object-store MiB the job may fill with units in flight (auto: 2 units per "
        "actor and tokenize task, at least 512).",
    )
    overwrite: bool = Field(False, description="Replace an existing, non-empty output.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (JSON), e.g. endpoint_url for S3."
    )

    @model_validator(mode="after")
    def _grouping_needs_group_column(self) -> Self:
        if (self.rank or self.top_k is not None) and not self.group_column:
            raise ValueError("--rank and --top-k need --group-column (the query-id column)")
        return self


class ServingSettings(SettingsSection):
    """The online service's own settings; the batching ones also change through ``user_config``."""

    served_model_name: str | None = Field(None, description="Model name clients send (default: model).")
    api_key: pydantic.SecretStr | None = Field(None, description="Require 'Authorization: Bearer KEY'.")
    max_documents: int = Field(1000, ge=1, description="Max documents (or pairs) per request.")
    max_document_chars: int = Field(20_000, ge=1, description="Max characters per document/query.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Max request body size.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="Extra wait for requests to batch (batches also form while the model is busy)."
    )
    max_pending_pairs: int = Field(8192, ge=1, description="Queue bound per replica; past it: 503.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds on 503 overload answers.")
    health_probe_interval_s: float = Field(
        10.0, gt=0, description="Health checks probe the model at most this often (a scored batch counts)."
    )


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


class RescoreSettings(ComposedSettings):
    """Settings of the offline rescoring job (``python -m jobs.rescore``)."""

    model: ModelSettings
    job: JobSettings


class ServeSettings(ComposedSettings):
    """Settings of the online service (``serve/``)."""

    model: ModelSettings
    serving: ServingSettings

    @model_validator(mode="after")
    def _no_model_activation(self) -> Self:
        if self.model.activation != "none":
            raise ValueError(
                "activation: not a service setting; each API defines its scores (/v1/rerank: sigmoid "
                "relevance; /rerank and /score: raw_scores per request), so leave it unset"
            )
        return self

    @property
    def served_model_name(self) -> str:
        """The name clients send and see: ``served_model_name``, else the model id."""
        return self.serving.served_model_name or self.model.model


class EvaluateSettings(SettingsSection):
    """Settings of the evaluation job (``python -m jobs.evaluate``); env prefix ``RERANK_EVAL_``."""

    model_config = SettingsConfigDict(env_prefix="RERANK_EVAL_", frozen=True, extra="forbid")

    scores: str | None = Field(None, description="Scored Parquet file, directory or glob (fsspec URI).")
    run: str | None = Field(None, description="TREC run file (qid Q0 docno rank score tag) instead.")
    qrels: str | None = Field(None, description="TREC qrels file (qid 0 docno grade).")
    query_column: str = Field("qid", description="Query-id column of --scores.")
    doc_column: str = Field("pid", description="Document-id column of --scores.")
    score_column: str = Field("score", description="Score column of --scores.")
    relevance_threshold: int = Field(2, ge=1, description="Lowest grade counted relevant by mrr and recall.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (JSON), e.g. endpoint_url for S3."
    )

    @model_validator(mode="after")
    def _one_run_and_qrels(self) -> Self:
        if (self.scores is None) == (self.run is None):
            raise ValueError("give exactly one of --scores (Parquet) and --run (TREC run file)")
        if not self.qrels:
            raise ValueError("--qrels is required")
        return self


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
