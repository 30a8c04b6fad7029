from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests never reach the network: the hub is offline for every test, and its cache is the session's own
# (empty, unless a test lays out a hub model there with tests.helpers.fake_hub_cache). Set before Ray
# starts, so Ray's workers read the same cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="rerank-test-hub-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
for _name in [name for name in os.environ if name.startswith("RERANK_")]:
    del os.environ[_name]

from tests.helpers import build_tiny_cross_encoder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT cross-encoder saved as a local HF model directory."""
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def larger_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny cross-encoder, 2 layers and other weights: the costlier stage of test cascades."""
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("larger-model"), seed=1, layers=2)


@pytest.fixture(scope="session")
def llm_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-style yes/no LLM reranker with its chat template, saved by sentence-transformers."""
    from tests.helpers import build_tiny_llm_reranker

    return build_tiny_llm_reranker(tmp_path_factory.mktemp("llm-reranker") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """The tiny model loaded once through the project's model class."""
    from reranker.model import CrossEncoderModel

    return CrossEncoderModel(str(tiny_model_dir))


@pytest.fixture(scope="session")
def larger_model(larger_model_dir: Path):  # type: ignore[no-untyped-def]
    """The second tiny model, loaded."""
    from reranker.model import CrossEncoderModel

    return CrossEncoderModel(str(larger_model_dir))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance for the whole test session (keeps CI fast), its Serve proxy as shipped."""
    import ray

    from serve.__main__ import SHIPPED_RAY_SERVE_ENV

    if not ray.is_initialized():
        for name, value in SHIPPED_RAY_SERVE_ENV.items():
            os.environ.setdefault(name, value)  # read by the processes Ray starts
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
