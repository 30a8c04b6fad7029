"""Storage retries: which errors are worth another try, and the backoff (tenacity, with jitter).

An error is transient by its type and its provider's error code, never by words in its message: a
corrupt file whose message happens to contain "503" is not retried. The whole exception chain is
read, since fsspec back ends wrap their client's error (s3fs raises ``OSError`` from botocore's
``ClientError``).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

logger = logging.getLogger(__name__)

STORAGE_ATTEMPTS = 5
BACKOFF_MULTIPLIER_S = 0.5
BACKOFF_MAX_S = 8.0
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EAGAIN,
        errno.EBUSY,  # s3fs's translation of SlowDown / 503
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    }
)
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset(  # S3 and GCS error codes of throttling and server-side faults
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "rateLimitExceeded",
        "backendError",
    }
)
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """True for storage errors worth retrying: throttling, timeouts, dropped connections, 5xx."""
    return any(_is_transient_one(error) for error in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_transient_one(error: BaseException) -> bool:
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    if _client_error_is_transient(error):
        return True
    status = getattr(error, "code", None) or getattr(error, "status", None)  # gcsfs HttpError, aiohttp
    return (isinstance(status, int) and status in TRANSIENT_STATUSES) or _network_error(error)


def _client_error_is_transient(error: BaseException) -> bool:
    """Botocore's ``ClientError``: by its error code or HTTP status."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in TRANSIENT_CODES or status in TRANSIENT_STATUSES


def _network_error(error: BaseException) -> bool:
    """Client libraries' connection and timeout errors, where those libraries are installed."""
    kinds: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        kinds += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        kinds += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    return isinstance(error, tuple(kinds))


def with_retries(action: Callable[[], T], what: str, attempts: int = STORAGE_ATTEMPTS) -> T:
    """Run a storage action, retrying transient errors with jittered exponential backoff.

    Raises:
        Exception: The last error, or the first one that is not transient.
    """
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=BACKOFF_MULTIPLIER_S, max=BACKOFF_MAX_S),
        before_sleep=_log_retry(what, attempts),
        sleep=_sleep,
        reraise=True,
    )
    return retrying(action)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _log_retry(what: str, attempts: int) -> Callable[[RetryCallState], None]:
    def log(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning("%s: %s; retry %d/%d in %.1fs", what, error, state.attempt_number, attempts - 1, delay)

    return log
