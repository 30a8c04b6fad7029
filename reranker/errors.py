"""Domain errors shared by the offline job and the online service.

Each error carries a stable ``error_type`` string. The job turns these into one-line
messages and a non-zero exit; the HTTP edge turns them into one JSON error shape.
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


class ValidationError(RerankError):
    """A request breaks the schema or a documented limit; the message names the field."""

    error_type = "validation_error"


class InvalidRequestError(RerankError):
    """A request that can't be parsed at all (invalid JSON, not an object)."""

    error_type = "invalid_request_error"


class ModelNotFoundError(RerankError):
    """A request named a model this server does not serve."""

    error_type = "model_not_found"


class OverloadedError(RerankError):
    """The server's queue is full; the client should retry later."""

    error_type = "overloaded"


class AuthenticationError(RerankError):
    """The request lacks a valid API key."""

    error_type = "authentication_error"


class PayloadTooLargeError(RerankError):
    """The request body, or an input that may not be truncated, is too large."""

    error_type = "payload_too_large"
