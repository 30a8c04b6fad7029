"""ray-rerank's core: the cross-encoder model class, shared by the offline job and the online service.

    from reranker import CrossEncoderModel

    model = CrossEncoderModel("cross-encoder/ms-marco-TinyBERT-L2-v2")
    model.predict([("what is ray", "Ray scales Python."), ("what is ray", "A fish.")])
    model.rank("what is ray", ["Ray scales Python.", "A fish."], top_k=1, return_documents=True)

Names load on first use: ``import reranker`` loads neither torch nor the weights' code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reranker.errors import ConfigError, InputError, ModelLoadError, OutputError, RerankError
    from reranker.model import CrossEncoderModel, ScoreResult
    from reranker.scores import sigmoid
    from reranker.settings import DEFAULT_MODEL, ModelOptions
    from reranker.tokenizer import EncodedPairs, PairTokenizer

__all__ = [
    "DEFAULT_MODEL",
    "ConfigError",
    "CrossEncoderModel",
    "EncodedPairs",
    "InputError",
    "ModelLoadError",
    "ModelOptions",
    "OutputError",
    "PairTokenizer",
    "RerankError",
    "ScoreResult",
    "sigmoid",
]
_WHERE = {
    "DEFAULT_MODEL": "reranker.settings",
    "ModelOptions": "reranker.settings",
    "CrossEncoderModel": "reranker.model",
    "ScoreResult": "reranker.model",
    "sigmoid": "reranker.scores",
    "EncodedPairs": "reranker.tokenizer",
    "PairTokenizer": "reranker.tokenizer",
    "ConfigError": "reranker.errors",
    "InputError": "reranker.errors",
    "ModelLoadError": "reranker.errors",
    "OutputError": "reranker.errors",
    "RerankError": "reranker.errors",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for."""
    if name not in _WHERE:
        raise AttributeError(f"module 'reranker' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
