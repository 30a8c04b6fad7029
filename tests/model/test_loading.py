"""What a model is checked for before it scores: a trained head, and which exact version is loaded."""

import os

import pytest

from reranker.errors import ModelLoadError
from reranker.loading import check_loadable, model_version, resolved_commit
from reranker.model import CrossEncoderModel
from reranker.settings import ModelSettings
from tests.helpers import build_headless_checkpoint, fake_hub_cache

pytestmark = pytest.mark.model

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


REFUSAL = {  # what each not-a-reranker checkpoint is refused for
    "bare-encoder": "no trained reranker head: classifier.bias, classifier.weight",  # else random
    "causal-lm": "is a causal LM without a chat template: not a reranker",  # nothing asks it to judge
}


@pytest.fixture(scope="module", params=sorted(REFUSAL))
def headless(request, tmp_path_factory):
    """A checkpoint that is no reranker: a bare encoder (transformers would give it a random head), a
    plain causal LM (sentence-transformers would read yes/no logits of an unprompted pair)."""
    directory = tmp_path_factory.mktemp(request.param) / "model"
    return request.param, build_headless_checkpoint(directory, request.param)


def test_a_checkpoint_without_a_head_is_refused_on_the_driver(headless):
    """check_loadable (the job's driver, no weights loaded) says why in one line naming the model."""
    kind, directory = headless
    with pytest.raises(ModelLoadError) as error:
        check_loadable(ModelSettings(model=str(directory)))
    message = str(error.value)
    assert REFUSAL[kind] in message and str(directory) in message
    assert len(message.splitlines()) == 1


def test_the_model_class_refuses_a_random_head(headless):
    """Loading the weights (library, service replica, job actor) refuses it with the same reason."""
    kind, directory = headless
    with pytest.raises(ModelLoadError, match=REFUSAL[kind]):
        CrossEncoderModel(str(directory))


def test_the_service_fails_to_start_with_that_line(headless):
    """A replica built on such a checkpoint fails in its constructor with the same one line."""
    from serve.app import replica_service

    kind, directory = headless
    with pytest.raises(ModelLoadError, match=REFUSAL[kind]):
        replica_service({"model": str(directory), "torch_threads": 1}, None)


def test_a_trained_cross_encoder_passes(tiny_model_dir):
    """The tiny cross-encoder has its head: no false alarm."""
    check_loadable(ModelSettings(model=str(tiny_model_dir)))


def test_a_directory_version_changes_with_its_files(tmp_path, tiny_model_dir):
    """A local model's version is stable, and changes when a weight file is rewritten."""
    import shutil

    directory = shutil.copytree(tiny_model_dir, tmp_path / "model")
    settings = ModelSettings(model=str(directory))
    before = model_version(settings)
    assert before.startswith("dir:") and model_version(settings) == before
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert model_version(settings) != before


def test_an_unpinned_hub_model_resolves_to_the_commit_main_points_at(tmp_path, monkeypatch, tiny_model_dir):
    """hub:<commit> follows main; when main moves, the version moves; a pinned commit stays."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "acme/tiny-reranker", tiny_model_dir, COMMIT_A)
    settings = ModelSettings(model="acme/tiny-reranker")
    assert model_version(settings) == f"hub:{COMMIT_A}"
    check_loadable(settings)  # the cached hub model loads offline, head checked from its header
    fake_hub_cache(tmp_path / "hub", "acme/tiny-reranker", tiny_model_dir, COMMIT_B)
    assert model_version(settings) == f"hub:{COMMIT_B}"
    assert resolved_commit(settings.model_copy(update={"revision": COMMIT_A})) == COMMIT_A
    with pytest.raises(ModelLoadError, match="acme/unknown"):
        model_version(ModelSettings(model="acme/unknown"))


def test_the_job_pins_its_workers_to_the_commit_the_driver_resolved():
    """Workers load the hub commit the driver resolved (main may move mid-job); a directory as given."""
    from reranker.loading import pinned_model

    hub = pinned_model(ModelSettings(model="acme/tiny-reranker"), f"hub:{COMMIT_A}")
    assert (hub.model, hub.revision) == ("acme/tiny-reranker", COMMIT_A)
    local = ModelSettings(model="/models/tiny")
    assert pinned_model(local, "dir:0123456789abcdef") == local
