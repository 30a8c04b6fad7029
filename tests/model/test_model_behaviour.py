import numpy as np
import pytest
import torch

from reranker.errors import ModelLoadError
from reranker.model import CrossEncoderModel, sigmoid
from tests.helpers import build_tiny_cross_encoder

pytestmark = pytest.mark.model

QUERIES = ["how do solar panels work", "what causes seasons", "vitamin d", "basil plant water"]
PASSAGES = [
    "solar panels convert sunlight into electricity",
    "the tilt of the earth axis causes seasons " * 3,
    "vitamin d comes from sunlight on the skin",
    "water basil when the soil is dry",
]


def test_scores_are_float32_in_input_order(tiny_model):
    """Scores come back float32, one per pair, aligned with the input order."""
    forward = tiny_model.score(QUERIES, PASSAGES).scores
    backward = tiny_model.score(QUERIES[::-1], PASSAGES[::-1]).scores
    assert forward.dtype == np.float32 and forward.shape == (4,)
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-6)


def test_scores_do_not_depend_on_batch_composition(tiny_model_dir):
    """Tiny and large token budgets give the same scores (padding is masked)."""
    queries, passages = QUERIES * 10, [p * (i % 4 + 1) for i, p in enumerate(PASSAGES * 10)]
    small = CrossEncoderModel(str(tiny_model_dir), max_batch_tokens=64)
    large = CrossEncoderModel(str(tiny_model_dir), max_batch_tokens=100_000)
    np.testing.assert_allclose(
        small.score(queries, passages).scores, large.score(queries, passages).scores, atol=1e-5
    )


def test_matches_sentence_transformers_predict(tiny_model, tiny_model_dir):
    """Same scores as sentence_transformers.CrossEncoder.predict on the same model."""
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(tiny_model_dir), activation_fn=torch.nn.Identity())
    pairs = list(zip(QUERIES * 5, PASSAGES[::-1] * 5, strict=True))
    np.testing.assert_allclose(tiny_model.predict(pairs), reference.predict(pairs), atol=1e-5)


def test_long_pairs_are_truncated_and_counted(tiny_model):
    """Pairs over max_length are cut to it and counted as truncated."""
    result = tiny_model.score(["q", "q"], ["solar " * 500, "short"])
    assert result.num_truncated == 1
    encoded = tiny_model.tokenize(["q"], ["solar " * 500])
    assert encoded.lengths.tolist() == [tiny_model.max_length]


def test_max_length_is_capped_by_the_model(tiny_model_dir):
    """Asking for more tokens than the model's positions gives the model's limit."""
    model = CrossEncoderModel(str(tiny_model_dir), max_length=4096)
    assert model.max_length == 64


def test_per_call_max_length_only_shortens(tiny_model):
    """A per-call limit can shorten truncation but never exceed the model's."""
    assert tiny_model.tokenize(["q"], ["solar " * 500], max_length=16).lengths.tolist() == [16]
    assert tiny_model.tokenize(["q"], ["solar " * 500], max_length=10_000).lengths.tolist() == [64]


def test_activation_is_a_per_call_choice(tiny_model, tiny_model_dir):
    """activation=sigmoid (setting or call) gives sigmoid(raw logits); no call changes another's."""
    raw = tiny_model.score(QUERIES, PASSAGES).scores
    np.testing.assert_allclose(
        tiny_model.score(QUERIES, PASSAGES, activation="sigmoid").scores, sigmoid(raw), atol=1e-6
    )
    np.testing.assert_allclose(tiny_model.score(QUERIES, PASSAGES).scores, raw)
    sig = CrossEncoderModel(str(tiny_model_dir), activation="sigmoid")
    np.testing.assert_allclose(sig.score(QUERIES, PASSAGES).scores, sigmoid(raw), atol=1e-6)
    np.testing.assert_allclose(sig.score(QUERIES, PASSAGES, activation="none").scores, raw, atol=1e-6)


def test_passage_token_cap_keeps_that_many_passage_tokens(tiny_model):
    """max_passage_tokens cuts each passage to its first (or, "left", last) N tokens, between words."""
    query, passage = "solar", "solar panels convert sunlight into electricity"  # into: in ##t ##o
    assert tiny_model.tokenizer.tokenize("into") == ["in", "##t", "##o"]
    cases = [
        ("right", 2, "solar panels"),
        ("left", 1, "electricity"),
        ("left", 3, "electricity"),
        ("left", 4, "into electricity"),
        ("right", 4, "solar panels"),
    ]
    for side, tokens, kept in cases:
        capped = tiny_model.tokenize([query], [passage], truncation_side=side, max_passage_tokens=tokens)
        assert capped.pair_ids() == tiny_model.tokenize([query], [kept]).pair_ids(), (side, tokens)
    uncut = tiny_model.tokenize([query], [passage], max_passage_tokens=1000)
    assert uncut.pair_ids() == tiny_model.tokenize([query], [passage]).pair_ids()


def test_rank_orders_best_first_with_top_k_and_documents(tiny_model):
    """rank() returns corpus ids best first, cut to top_k, with text on request."""
    scores = tiny_model.score([QUERIES[0]] * 4, PASSAGES).scores
    ranked = tiny_model.rank(QUERIES[0], PASSAGES, top_k=2, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == np.argsort(-scores)[:2].tolist()
    assert ranked[0]["text"] == PASSAGES[ranked[0]["corpus_id"]]
    assert "text" not in tiny_model.rank(QUERIES[0], PASSAGES)[0]


def test_empty_input_scores_nothing(tiny_model):
    """No pairs: an empty float32 array and zero counts."""
    result = tiny_model.score([], [])
    assert result.scores.shape == (0,) and result.num_tokens == 0


def test_mismatched_lengths_are_rejected(tiny_model):
    """Queries and passages must pair up."""
    with pytest.raises(ValueError):
        tiny_model.score(["a"], ["b", "c"])


def test_two_label_heads_score_by_log_odds(tmp_path):
    """A 2-label reranker head scores by logit[1] - logit[0]."""
    directory = build_tiny_cross_encoder(tmp_path / "two", num_labels=2)
    model = CrossEncoderModel(str(directory))
    encoded = model.tokenize(QUERIES, PASSAGES)
    with torch.inference_mode():
        logits = model.model(**model.tokenizer(QUERIES, PASSAGES, padding=True, return_tensors="pt")).logits
    np.testing.assert_allclose(
        model.score(QUERIES, PASSAGES).scores, (logits[:, 1] - logits[:, 0]).numpy(), atol=1e-5
    )
    assert encoded.lengths.shape == (4,)


def test_missing_local_directory_gives_one_clear_error(tmp_path):
    """A path that isn't a model fails with ModelLoadError saying how to point at a local copy."""
    with pytest.raises(ModelLoadError, match="--model DIR"):
        CrossEncoderModel(str(tmp_path / "no-such-model"))


def test_hub_id_without_network_gives_one_clear_error():
    """A hub id that isn't cached, offline, fails with the same guidance (and no network call)."""
    with pytest.raises(ModelLoadError, match="RERANK_MODEL=DIR"):
        CrossEncoderModel("cross-encoder/definitely-not-cached-here")
