"""Domain errors shared by the offline job and the online service.

Each error carries a stable ``error_type`` string. The job turns these into one-line
messages and a non-zero exit; a program's edge maps them to its own answers.
"""

from __future__ import annotations


class RerankError(Exception):
    """Base class for every error this project raises on purpose."""

    error_type = "rerank_error"


class ConfigError(RerankError):
    """A setting is invalid or inconsistent (bad flag, env var or config file)."""

    error_type = "config_error"


class ModelLoadError(RerankError):
    """The model could not be loaded from the hub or a local directory."""

    error_type = "model_load_error"


class InputError(RerankError):
    """The input data is unusable: missing path, column, wrong type, corrupt file."""

    error_type = "input_error"


class OutputError(RerankError):
    """The output location is unusable (already has data, not writable)."""

    error_type = "output_error"
