"""Every reranker family behind one model class, scored as sentence-transformers' CrossEncoder scores it.

Tiny random models of each family are built here and saved the way their hub versions are: BERT and
XLM-R sequence classifiers (Hugging Face), a modular Transformer -> Pooling -> Dense cross-encoder and a
Qwen3-style yes/no LLM reranker (sentence-transformers' save), the same LLM reranker as a plain Hugging
Face checkpoint with its chat template (sentence-transformers' default chain), and a converted Qwen3
sequence classifier that expects the template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reranker import ConfigError, CrossEncoderModel, ModelLoadError
from reranker.encoders import pair_encoder
from reranker.families import model_family
from reranker.loading import check_loadable
from reranker.settings import ModelOptions
from tests.helpers import (
    PASSAGES,
    PLAIN_CHAT_TEMPLATE,
    QUERIES,
    build_tiny_cross_encoder,
    build_tiny_llm_reranker,
    build_tiny_modular_cross_encoder,
    build_tiny_templated_classifier,
    build_tiny_xlmr_classifier,
)

pytestmark = pytest.mark.model

BUILDERS = {  # family name -> (builder, family, kind, takes an instruction)
    "bert": (build_tiny_cross_encoder, "sequence-classification", "sequence-classification", False),
    "xlm-r": (build_tiny_xlmr_classifier, "sequence-classification", "sequence-classification", False),
    "modular": (build_tiny_modular_cross_encoder, "sentence-transformers", "sentence-transformers", False),
    "llm": (build_tiny_llm_reranker, "sentence-transformers", "llm-yes-no", True),
    "llm-hf-save": (
        lambda directory: build_tiny_llm_reranker(directory, st_save=False),
        "sentence-transformers",
        "llm-yes-no",
        True,
    ),
    "templated-classifier": (
        build_tiny_templated_classifier, "sentence-transformers", "sentence-transformers", True
    ),
}  # fmt: skip
PAIRS = [(query, passage) for query in QUERIES for passage in PASSAGES] + [
    (QUERIES[0], " ".join(PASSAGES * 12))  # long: truncated the same way
]
INSTRUCTION = "Judge whether the passage explains the query"


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    """Each family's tiny model: its name, directory, and what the class should make of it."""
    build, expected_family, kind, takes = BUILDERS[request.param]
    return (
        request.param,
        build(tmp_path_factory.mktemp(request.param) / "model"),
        expected_family,
        kind,
        takes,
    )


def reference(directory: Path, instruction: str | None = None) -> np.ndarray:
    """sentence-transformers' raw scores (no activation) on PAIRS."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(directory))
    return model.predict(PAIRS, prompt=instruction, activation_fn=torch.nn.Identity())


def test_the_library_scores_each_family_as_sentence_transformers(family):
    """predict equals CrossEncoder.predict (raw) within 1e-5 (fp32), with and without an instruction
    where the model takes one; the family and kind are what the checkpoint says."""
    _, directory, expected_family, kind, takes = family
    model = CrossEncoderModel(str(directory), max_batch_tokens=512)
    assert (model.family, model.kind, model.takes_instruction) == (expected_family, kind, takes)
    np.testing.assert_allclose(model.predict(PAIRS), reference(directory), atol=1e-5)
    if takes:
        with_instruction = model.predict(PAIRS, instruction=INSTRUCTION)
        np.testing.assert_allclose(with_instruction, reference(directory, INSTRUCTION), atol=1e-5)
        assert np.abs(with_instruction - model.predict(PAIRS)).max() > 1e-4  # the instruction is read
        default = CrossEncoderModel(str(directory), instruction=INSTRUCTION)
        np.testing.assert_allclose(default.predict(PAIRS), with_instruction, atol=1e-5)
    else:
        with pytest.raises(ConfigError, match="instruction"):
            model.predict(PAIRS, instruction=INSTRUCTION)


def test_tokenization_needs_no_weights_and_matches_the_model(family):
    """The CPU half (what a job's tokenize task loads) prepares the same token ids as the loaded model,
    without reading the weights: a sentence-transformers model is built on the meta device."""
    _, directory, *_ = family
    options = ModelOptions(model=str(directory))
    encoder = pair_encoder(options)
    if model_family(options) == "sentence-transformers":
        assert next(encoder.cross_encoder[0].parameters()).device.type == "meta"  # type: ignore[attr-defined]
    queries, passages = [q for q, _ in PAIRS], [p for _, p in PAIRS]
    ours, theirs = (
        encoder.tokenize(queries, passages),
        CrossEncoderModel(str(directory)).tokenize(queries, passages),
    )
    assert ours.pair_ids() == theirs.pair_ids() and ours.truncated.tolist() == theirs.truncated.tolist()
    assert ours.truncated[-1] and not ours.truncated[:-1].any()


def test_the_driver_check_accepts_each_family(family):
    """check_loadable (a job's driver) passes every trained reranker, with its instruction if it takes one."""
    _, directory, _, _, takes = family
    check_loadable(ModelOptions(model=str(directory), instruction=INSTRUCTION if takes else None))
    if not takes:
        with pytest.raises(ConfigError, match=r"instruction: .* takes none"):
            check_loadable(ModelOptions(model=str(directory), instruction=INSTRUCTION))


def test_an_llm_whose_template_cannot_carry_a_pair_is_refused(tmp_path):
    """A chat model's template (system/user/assistant only) would score an empty prompt: one line."""
    directory = build_tiny_llm_reranker(tmp_path / "chat", st_save=False, template=PLAIN_CHAT_TEMPLATE)
    for load in (
        lambda: check_loadable(ModelOptions(model=str(directory))),
        lambda: CrossEncoderModel(str(directory)),
    ):
        with pytest.raises(ModelLoadError, match="cannot prepare a query-document pair") as caught:
            load()
        assert len(str(caught.value).splitlines()) == 1


def test_configured_true_and_false_tokens_are_read(tmp_path):
    """true_token / false_token replace yes / no: the score is logit(true) - logit(false), as a
    LogitScore on those tokens computes it; an unknown token is one line."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.modules import LogitScore

    directory = build_tiny_llm_reranker(tmp_path / "llm", st_save=False)
    ours = CrossEncoderModel(str(directory), true_token="no", false_token="yes")
    reference_model = CrossEncoder(str(directory))
    vocabulary = reference_model.tokenizer.get_vocab()
    reference_model[1] = LogitScore(vocabulary["no"], vocabulary["yes"])
    expected = reference_model.predict(PAIRS, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(ours.predict(PAIRS), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="true_token: 'maybe' is not a token"):
        CrossEncoderModel(str(directory), true_token="maybe")
    with pytest.raises(ConfigError, match="reads no token logits"):
        check_loadable(ModelOptions(model=str(build_tiny_cross_encoder(tmp_path / "bert")), true_token="yes"))
