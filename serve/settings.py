"""The service's settings: its own section composed with the model's (resolved in each replica)."""

from __future__ import annotations

import functools
from typing import Literal, Self

import pydantic
from pydantic import Field, field_validator, model_validator

from reranker.cascade import CascadeSettings, CascadeStage, resolve_stages
from reranker.settings import ComposedSettings, ModelSettings, SettingsSection

# serve.proxy's own variables (read in Serve's proxy process, which sees no Serve config's args).
PROXY_BUFFER_ENV = "RERANK_PROXY_BUFFER_BYTES"  # the most one request keeps for a retry
PROXY_BUFFER_TOTAL_ENV = "RERANK_PROXY_BUFFER_TOTAL_BYTES"  # the most all requests of a proxy keep
PROXY_APPS_ENV = "RERANK_PROXY_APPS"  # comma-separated Serve app names whose requests may be retried
MAX_BODY_ENV = "RERANK_MAX_BODY_BYTES"  # the replicas' max_body_bytes; caps the buffer when set there
DEFAULT_BUFFER_BYTES = 1024 * 1024
DEFAULT_BUFFER_TOTAL_BYTES = 64 * 1024 * 1024
DEFAULT_APPS = "rerank"  # the app name in configs/serve.yaml


class ServingSettings(SettingsSection):
    """The online service's own settings; the batching ones also change through ``user_config``."""

    served_model_name: str | None = Field(None, description="Model name clients send (default: model).")
    api_key: pydantic.SecretStr | None = Field(
        None, description="Require 'Authorization: Bearer KEY' (an empty key is refused at start)."
    )
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
    max_rerank_count: int = Field(
        100,
        ge=1,
        description="Cascades: the most documents a request's rerank_count may pass to the last stage.",
    )
    cascade_layout: Literal["one_replica", "deployment_per_stage"] = Field(
        "one_replica",
        description="Cascades: every stage in each replica, or each stage its own deployment (own "
        "replicas, autoscaling and resources) behind an ingress that calls them by handle.",
    )

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        """Fail closed: a secret that resolved empty must not turn authentication off."""
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("is empty: unset it to serve without a key, or give the key")
        return key


class ServeSettings(ComposedSettings):
    """Settings of the online service (``serve/``)."""

    model: ModelSettings
    serving: ServingSettings
    cascade: CascadeSettings
    other_env = frozenset({PROXY_BUFFER_ENV, PROXY_BUFFER_TOTAL_ENV, PROXY_APPS_ENV})  # serve.proxy's

    @model_validator(mode="after")
    def _no_model_activation(self) -> Self:
        if any(stage.activation != "none" for stage in self.stages):
            raise ValueError(
                "activation: not a service setting; each API defines its scores (/v1/rerank: sigmoid "
                "relevance; /rerank and /score: raw_scores per request), so leave it unset"
            )
        return self

    @functools.cached_property
    def stages(self) -> list[CascadeStage]:
        """The scoring stages: the cascade's, each completed from the model settings; else the model.

        Computed once (the settings are frozen): the service reads it on every request.
        """
        return resolve_stages(self.model, self.cascade.cascade)

    @property
    def served_model_name(self) -> str:
        """The name clients send and see: ``served_model_name``, else the (last stage's) model id."""
        return self.serving.served_model_name or self.stages[-1].model
