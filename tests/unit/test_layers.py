"""Each layer owns its things: the core knows no HTTP, and the HTTP schemas need no torch."""

import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.unit


def modules_loaded_by(statement: str) -> set[str]:
    """Top-level modules a fresh interpreter has loaded after running ``statement``."""
    code = f"{statement}; import sys; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_core_imports_nothing_from_fastapi_or_starlette():
    """reranker/ (model, batching, settings, errors, types) loads without any HTTP framework."""
    loaded = modules_loaded_by("import reranker.model, reranker.batching, reranker.settings, reranker.errors")
    assert not loaded & {"fastapi", "starlette", "serve"}


def test_importing_the_schemas_does_not_import_torch():
    """The request/response schemas are light: no torch, no transformers."""
    loaded = modules_loaded_by("import serve.schemas")
    assert not loaded & {"torch", "transformers"}
    assert "pydantic" in loaded  # the check itself works
