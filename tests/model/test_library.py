"""The model class as a library: plain arguments, no environment, sentence-transformers' call shapes."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import reranker
from reranker import ConfigError, CrossEncoderModel
from tests.helpers import DL19_TSV, REPO_ROOT, TWIN_MODEL, read_trec_tsv, require

pytestmark = pytest.mark.model

QUERY = "how do solar panels work"
DOCUMENTS = ["solar panels convert sunlight", "bananas are yellow", "the sun makes energy", "python language"]


def test_public_names_resolve_and_are_listed():
    """Every name in reranker.__all__ imports; an unknown one is an AttributeError."""
    for name in reranker.__all__:
        assert getattr(reranker, name) is not None
    with pytest.raises(AttributeError):
        reranker.NoSuchThing  # noqa: B018


def test_importing_the_package_loads_no_torch():
    """`import reranker` stays light: torch and the model module load on first use of a name."""
    code = "import sys, reranker; print('torch' in sys.modules or 'reranker.model' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert done.stdout.strip() == "False"


def test_the_constructor_reads_no_environment(monkeypatch, tiny_model_dir):
    """RERANK_* variables, even invalid ones, do not reach the library class."""
    monkeypatch.setenv("RERANK_MAX_LENGTH", "not-a-number")
    monkeypatch.setenv("RERANK_ACTIVATION", "sigmoid")
    monkeypatch.setenv("RERANK_DEVICE", "cuda:7")
    model = CrossEncoderModel(str(tiny_model_dir), max_length=32)
    assert (model.settings.max_length, model.settings.activation, model.device.type) == (32, "none", "cpu")


def test_torch_threads_change_only_when_asked(tiny_model_dir):
    """Loading leaves torch's process-wide thread count alone unless torch_threads is given."""
    before = torch.get_num_threads()
    CrossEncoderModel(str(tiny_model_dir))
    assert torch.get_num_threads() == before


def test_a_bad_option_is_one_config_error(tiny_model_dir):
    """Invalid options fail before anything loads, naming the option."""
    with pytest.raises(ConfigError, match="max_length"):
        CrossEncoderModel(str(tiny_model_dir), max_length=2)
    with pytest.raises(ConfigError, match="precision"):
        CrossEncoderModel(str(tiny_model_dir), precision="fp8")  # type: ignore[arg-type]


def test_predict_takes_one_pair_or_many_and_a_batch_size(tiny_model):
    """A single pair gives one float32; batch sizes and list order change nothing but speed."""
    pairs = [(QUERY, document) for document in DOCUMENTS]
    scores = tiny_model.predict(pairs)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    single = tiny_model.predict(pairs[2])
    assert isinstance(single, np.float32) and single == pytest.approx(scores[2], abs=1e-6)
    np.testing.assert_allclose(tiny_model.predict(pairs, batch_size=1), scores, atol=1e-6)


def test_activation_is_per_call_and_never_sticks(tiny_model):
    """predict(activation="sigmoid") squashes that call only; the next call is raw logits again."""
    pairs = [(QUERY, document) for document in DOCUMENTS]
    logits = tiny_model.predict(pairs)
    probabilities = tiny_model.predict(pairs, activation="sigmoid")
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), atol=1e-6)
    np.testing.assert_allclose(tiny_model.predict(pairs), logits, atol=1e-7)


def test_rank_has_cross_encoders_shape(tiny_model, tiny_model_dir):
    """rank(query, docs, top_k, return_documents) gives CrossEncoder.rank's dicts, order and scores."""
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(tiny_model_dir), activation_fn=torch.nn.Identity())
    for kwargs in ({}, {"top_k": 2}, {"top_k": 3, "return_documents": True}):
        ours = tiny_model.rank(QUERY, DOCUMENTS, **kwargs)
        theirs = reference.rank(QUERY, DOCUMENTS, **kwargs)
        assert [set(r) for r in ours] == [set(r) for r in theirs]
        assert [r["corpus_id"] for r in ours] == [r["corpus_id"] for r in theirs]
        assert [r["score"] for r in ours] == pytest.approx([float(r["score"]) for r in theirs], abs=1e-5)
        assert [r.get("text") for r in ours] == [r.get("text") for r in theirs]


@pytest.mark.shared
def test_the_library_matches_cross_encoder_on_dl19(monkeypatch):
    """`from reranker import CrossEncoderModel` on the DL19 pairs: CrossEncoder.predict within 1e-5, with a
    bad RERANK_* variable set; rank() orders each query's passages as CrossEncoder.rank does."""
    from sentence_transformers import CrossEncoder

    monkeypatch.setenv("RERANK_MAX_LENGTH", "not-a-number")
    frame = read_trec_tsv(require(DL19_TSV))
    pairs = list(zip(frame["query"], frame["passage"], strict=True))
    model = CrossEncoderModel(str(require(TWIN_MODEL)))
    reference = CrossEncoder(str(TWIN_MODEL), activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(model.predict(pairs), reference.predict(pairs, batch_size=64), atol=1e-5)
    _, group = next(iter(frame.groupby("qid", sort=False)))
    documents = group["passage"].tolist()
    ours = model.rank(group["query"].iloc[0], documents, top_k=10)
    theirs = reference.rank(group["query"].iloc[0], documents, top_k=10)
    assert [r["score"] for r in ours] == pytest.approx([float(r["score"]) for r in theirs], abs=1e-5)
