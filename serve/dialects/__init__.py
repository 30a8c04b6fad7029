"""The rerank API dialects clients speak, one module each: its schemas and its translation.

A dialect turns its request body into one ``serve.core`` call and the core's answer back into its own
response; it knows nothing of HTTP (``serve.api`` mounts every dialect on its paths). Where several
dialects share a path (``/rerank``: TEI, Voyage, infinity, Cohere / vLLM), each one's ``claims`` looks at
the raw body, in the order of ``DIALECTS``; the last one on a path takes what no other claims.

Adding a dialect is one module here (a ``Dialect`` and its schemas), a line in ``DIALECTS``, and its tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from serve.core import RerankService


def claims_any(body: Mapping[str, Any]) -> bool:
    """The default dialect of a path claims every body."""
    return True


@dataclass(frozen=True)
class Dialect:
    """One API dialect: where it is served, its request and response schemas, and its handler."""

    name: str  # also the tag of its request in a path's body union (and OpenAPI)
    paths: tuple[str, ...]
    request: type[BaseModel]
    response: Any  # its response schema (a model, or a list of one)
    handle: Callable[[RerankService, Any], Awaitable[Any]]
    claims: Callable[[Mapping[str, Any]], bool] = claims_any
    summary: str = ""

    @property
    def tag(self) -> str:
        """Its member's tag in a shared path's body union: it shows in error locations, never a field's."""
        return f"{self.name} body"


def all_dialects() -> list[Dialect]:
    """Every dialect, in the order a shared path tries them (the most specific first)."""
    from serve.dialects import cohere, infinity, nim, pairs, tei, vllm_score, voyage

    return [
        tei.DIALECT,
        voyage.DIALECT,
        infinity.DIALECT,
        cohere.DIALECT,
        nim.DIALECT,
        pairs.DIALECT,
        vllm_score.DIALECT,
    ]


def by_path(dialects: list[Dialect]) -> dict[str, list[Dialect]]:
    """The dialects served on each path, in the order they are tried."""
    paths: dict[str, list[Dialect]] = {}
    for dialect in dialects:
        for path in dialect.paths:
            paths.setdefault(path, []).append(dialect)
    return paths


def dialect_of(dialects: list[Dialect], body: Any) -> Dialect:
    """The dialect of a body: of a parsed request, its schema's; of a raw one, the first that claims it."""
    if isinstance(body, BaseModel):
        return next(dialect for dialect in dialects if isinstance(body, dialect.request))
    if isinstance(body, Mapping):
        return next((dialect for dialect in dialects if dialect.claims(body)), dialects[-1])
    return dialects[-1]  # not an object: the default's schema says what is wrong
