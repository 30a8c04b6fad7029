import logging

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from reranker import cls_forward
from reranker.cls_forward import ClsForward, build_cls_forward
from reranker.model import CrossEncoderModel

pytestmark = pytest.mark.model


def tiny_bert(layers: int, labels: int = 1, act: str = "gelu") -> BertForSequenceClassification:
    """A random BERT classifier in eval mode."""
    torch.manual_seed(layers * 10 + labels)
    config = BertConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=labels,
        hidden_act=act,
    )
    return BertForSequenceClassification(config).eval()


def padded_batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    """Random token ids, right-padded, with segment B starting half-way."""
    width = max(lengths)
    sizes = torch.tensor(lengths)[:, None]
    mask = (torch.arange(width) < sizes).long()
    return {
        "input_ids": torch.randint(5, 200, (len(lengths), width)) * mask,
        "attention_mask": mask,
        "token_type_ids": (torch.arange(width) >= sizes // 2).long() * mask,
    }


@pytest.mark.parametrize(("layers", "labels", "act"), [(1, 1, "gelu"), (3, 1, "gelu"), (2, 2, "relu")])
@torch.inference_mode()
def test_equals_the_full_forward(layers, labels, act):
    """Logits equal the Hugging Face forward's within 1e-5 (1-3 layers, 1-2 labels, any activation)."""
    model = tiny_bert(layers, labels, act)
    inputs = padded_batch([40, 33, 7, 2, 40])
    expected = model(**inputs).logits
    actual = ClsForward(model)(**inputs)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-5)


@torch.inference_mode()
def test_padding_does_not_change_a_pairs_logit():
    """A pair's logit is the same alone and padded inside a longer batch."""
    model = ClsForward(tiny_bert(2))
    inputs = padded_batch([9, 30])
    alone = {key: value[:1, :9] for key, value in inputs.items()}
    np.testing.assert_allclose(model(**alone)[0].numpy(), model(**inputs)[0].numpy(), atol=1e-5)


def test_other_architectures_keep_the_full_forward():
    """A non-BERT classifier gets no [CLS]-only forward."""
    config = DistilBertConfig(vocab_size=200, dim=32, n_layers=1, n_heads=2, hidden_dim=48, num_labels=1)
    assert build_cls_forward(DistilBertForSequenceClassification(config).eval(), torch.float32) is None


def test_a_failed_agreement_check_falls_back(monkeypatch, caplog):
    """If the check batch disagrees beyond tolerance, the full forward is kept and a warning logged."""
    monkeypatch.setattr(cls_forward, "_check_difference", lambda model, fast: 1e-3)
    with caplog.at_level(logging.WARNING):
        assert build_cls_forward(tiny_bert(2), torch.float32) is None
    assert "using the full forward" in caplog.text


def test_model_class_scores_equal_with_and_without_it(tiny_model_dir):
    """The model class gives the same scores with the [CLS]-only forward on and off."""
    queries = ["how do solar panels work", "vitamin d"] * 6
    passages = [f"solar panels convert sunlight {'into electricity ' * i}" for i in range(12)]
    scores = [
        CrossEncoderModel(str(tiny_model_dir), cls_only_last_layer=flag).score(queries, passages).scores
        for flag in (True, False)
    ]
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)
