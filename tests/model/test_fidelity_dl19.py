import numpy as np
import pytest
import torch

from reranker.model import CrossEncoderModel
from tests.helpers import DL19_TSV, TWIN_MODEL, read_trec_tsv, require

pytestmark = [pytest.mark.model, pytest.mark.shared]


def test_twin_matches_cross_encoder_predict_on_all_dl19_pairs():
    """All 4,300 DL19 pairs: max |ours - CrossEncoder.predict| <= 1e-5 on CPU fp32."""
    from sentence_transformers import CrossEncoder

    pairs = read_trec_tsv(require(DL19_TSV))
    model = CrossEncoderModel(str(require(TWIN_MODEL)))
    ours = model.score(pairs["query"].tolist(), pairs["passage"].tolist()).scores
    reference = CrossEncoder(str(TWIN_MODEL), activation_fn=torch.nn.Identity()).predict(
        list(zip(pairs["query"], pairs["passage"], strict=True)), batch_size=64
    )
    assert len(ours) == 4300
    assert float(np.abs(ours - reference).max()) <= 1e-5
