"""The job programs' settings: what the rescoring job and the evaluation job read, composed with the model's.

Each program owns its settings; ``reranker.settings`` holds the model's section and the machinery
(precedence, config files, flags).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from reranker.cascade import CascadeSettings, CascadeStage, resolve_stages
from reranker.settings import ComposedSettings, ModelSettings, SettingsSection


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
        20_000,
        ge=1,
        description="Rows per work unit: the grain of scoring, commit and resume (GPU nodes: ~200000).",
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
    cluster_config: str | None = Field(
        None,
        description="The autoscaler's cluster config (YAML: node types and max_workers): pools grow to "
        "what it can start (auto: Ray's record, else ~/ray_bootstrap_config.yaml, where `ray up` puts it).",
    )
    object_store_mib: int | None = Field(
        None,
        ge=64,
        description="Object-store MiB the job may fill with units in flight (auto: 2 units per "
        "actor and tokenize task, at least 512).",
    )
    overwrite: bool = Field(False, description="Replace an existing, non-empty output.")
    dry_run: bool = Field(
        False,
        description="Print the plan (inputs, units, resumed units, actor pool, stages) and exit: nothing is "
        "scored or written.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (JSON), e.g. endpoint_url for S3."
    )

    @field_validator("cluster_config")
    @classmethod
    def _cluster_config_is_a_file(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"no such file: {path}")
        return path

    @model_validator(mode="after")
    def _grouping_needs_group_column(self) -> Self:
        if (self.rank or self.top_k is not None) and not self.group_column:
            raise ValueError("--rank and --top-k need --group-column (the query-id column)")
        return self


class RescoreSettings(ComposedSettings):
    """Settings of the offline rescoring job (``python -m jobs.rescore``)."""

    model: ModelSettings
    job: JobSettings
    cascade: CascadeSettings

    @model_validator(mode="after")
    def _cascade_needs_groups(self) -> Self:
        if self.cascade.cascade and not self.job.group_column:
            raise ValueError("a cascade needs --group-column (the query-id column): k is per query")
        if len({stage.activation for stage in self.stages}) > 1:
            raise ValueError("a cascade's stages write their scores with one activation: set it once")
        return self

    @functools.cached_property
    def stages(self) -> list[CascadeStage]:
        """The scoring stages: the cascade's, each completed from the model settings; else the model.

        Computed once (the settings are frozen): the service reads it on every request.
        """
        return resolve_stages(self.model, self.cascade.cascade)

    @property
    def adds_rank(self) -> bool:
        """Whether the output gets a ``rank`` column (asked for, or a cascade's final order)."""
        return self.job.rank or bool(self.cascade.cascade)


class EvaluateSettings(SettingsSection):
    """Settings of the evaluation job (``python -m jobs.evaluate``); env prefix ``RERANK_EVAL_``."""

    model_config = SettingsConfigDict(env_prefix="RERANK_EVAL_", frozen=True, extra="forbid")

    scores: str | None = Field(None, description="Scored Parquet file, directory or glob (fsspec URI).")
    run: str | None = Field(None, description="TREC run file (qid Q0 docno rank score tag) instead.")
    qrels: str | None = Field(None, description="TREC qrels file (qid 0 docno grade).")
    query_column: str = Field("qid", description="Query-id column of --scores.")
    doc_column: str = Field("pid", description="Document-id column of --scores.")
    score_column: str = Field("score", description="Score column of --scores.")
    rank_column: str | None = Field(
        None, description="Order by this 1-based rank column instead (a cascade's output: rank)."
    )
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
