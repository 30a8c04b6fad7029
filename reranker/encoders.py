"""The CPU half of every model family: the pair encoder a tokenization task loads (no weights)."""

from __future__ import annotations

from reranker.families import SEQUENCE_CLASSIFICATION, model_family
from reranker.settings import ModelOptions
from reranker.tokenizer import PairEncoder, PairTokenizer


def pair_encoder(settings: ModelOptions) -> PairEncoder:
    """The encoder of the model's family: ``PairTokenizer``, or the sentence-transformers preparation.

    Raises:
        ModelLoadError: The model can't be read, or cannot prepare a query-document pair.
    """
    if model_family(settings) == SEQUENCE_CLASSIFICATION:
        return PairTokenizer(settings)
    from reranker.st_backend import TemplatePairEncoder, load_cross_encoder

    return TemplatePairEncoder(load_cross_encoder(settings, weights=False), settings)
