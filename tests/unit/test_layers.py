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


def test_core_imports_no_ray_http_or_program():
    """Every module of reranker/ loads without Ray, an HTTP framework, or the programs built on it."""
    modules = sorted(path.stem for path in (REPO_ROOT / "reranker").glob("*.py") if path.stem != "__init__")
    loaded = modules_loaded_by("import " + ", ".join(f"reranker.{name}" for name in modules))
    assert not loaded & {"ray", "fastapi", "starlette", "serve", "jobs"}
    assert "torch" in loaded  # the check itself works: reranker.model was imported


def test_core_settings_describe_no_cluster_or_service():
    """The core's settings are the model's alone: no actor pools, object stores, API keys or 503s."""
    from reranker.settings import ModelOptions, ModelSettings

    banned = (
        "actor",
        "object_store",
        "api_key",
        "retry",
        "http",
        "serve",
        "replica",
        "ray",
        "gpus",
        "io_cpus",
    )
    for settings in (ModelOptions, ModelSettings):
        for name in settings.model_fields:
            assert not any(word in name for word in banned), name


def test_importing_the_schemas_does_not_import_torch():
    """The request/response schemas are light: no torch, no transformers."""
    loaded = modules_loaded_by("import serve.schemas")
    assert not loaded & {"torch", "transformers"}
    assert "pydantic" in loaded  # the check itself works


@pytest.mark.parametrize(
    "statement",
    [
        "import serve.app",  # Serve builds the app (build_app) in a task that never scores
        "import jobs.pipeline, jobs.commit",  # the job's commit and read tasks
        "import jobs.rescore",  # the driver, until it checks the model
    ],
)
def test_what_needs_no_model_loads_no_torch(statement):
    """Building the Serve app and the job's non-scoring steps import neither torch nor transformers."""
    loaded = modules_loaded_by(statement)
    assert not loaded & {"torch", "transformers"}
    assert "ray" in loaded  # the check itself works: the statement ran
