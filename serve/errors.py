"""Errors of the HTTP edge, each with its status code; only ``serve/`` knows HTTP.

The core's domain errors (``reranker.errors``) that can reach a request map to statuses here too.
"""

from __future__ import annotations

from reranker.errors import ConfigError, ModelLoadError, RerankError


class InvalidRequestError(RerankError):
    """A request that can't be parsed at all (invalid JSON, not an object)."""

    error_type = "invalid_request_error"


class AuthenticationError(RerankError):
    """The request lacks a valid API key."""

    error_type = "authentication_error"


class ModelNotFoundError(RerankError):
    """A request named a model this server does not serve."""

    error_type = "model_not_found"


class PayloadTooLargeError(RerankError):
    """The request body, or an input that may not be truncated, is too large."""

    error_type = "payload_too_large"


class RequestValidationError(RerankError):
    """A request breaks the schema or a documented limit; the message names the field."""

    error_type = "validation_error"


class OverloadedError(RerankError):
    """The replica's queue is full or the model can't score; the client should retry later."""

    error_type = "overloaded"


class ReplicaLostError(RerankError):
    """A request's replica (or a cascade stage's) died before answering, and so did its one retry."""

    error_type = "replica_unavailable"


STATUS_BY_ERROR: dict[type[RerankError], int] = {
    InvalidRequestError: 400,
    AuthenticationError: 401,
    ModelNotFoundError: 404,
    PayloadTooLargeError: 413,
    RequestValidationError: 422,
    ConfigError: 500,  # the server's configuration, not the request, is wrong
    OverloadedError: 503,
    ModelLoadError: 503,
    ReplicaLostError: 503,
}


def status_of(error: RerankError) -> int:
    """The HTTP status of a domain or edge error (500 for an unexpected kind)."""
    return next((status for kind, status in STATUS_BY_ERROR.items() if isinstance(error, kind)), 500)
