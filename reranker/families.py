"""Which model family a checkpoint belongs to, from its small files alone (no torch, no weights).

Two families, one model class (``reranker.model``):

- ``sequence-classification``: a plain ``*ForSequenceClassification`` cross-encoder (BERT, MiniLM,
  XLM-R, ModernBERT, ...) that reads a (query, passage) text pair: tokenized by ``PairTokenizer`` and
  scored by the Hugging Face model (BERT with the exact [CLS]-only last layer). The fast path.
- ``sentence-transformers``: everything sentence-transformers defines beyond that, loaded and scored
  as its ``CrossEncoder`` does (``reranker.st_backend``): causal-LM yes/no rerankers (Transformer +
  LogitScore, a chat template around query, document and instruction), sequence classifiers that
  expect a chat template (converted LLM rerankers), and modular chains (Transformer -> Pooling -> Dense).

A checkpoint goes the fast way only when sentence-transformers would score it as a plain text pair
too: no chat template, no prompts, no module chain beyond one sequence-classification Transformer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from reranker.loading import model_file
from reranker.settings import ModelOptions

Family = Literal["sequence-classification", "sentence-transformers"]
SEQUENCE_CLASSIFICATION: Family = "sequence-classification"
SENTENCE_TRANSFORMERS: Family = "sentence-transformers"
_TRANSFORMER_MODULES = (
    "sentence_transformers.base.modules.transformer.Transformer",
    "sentence_transformers.base.models.Transformer",
    "sentence_transformers.models.Transformer",
)


def model_family(options: ModelOptions) -> Family:
    """The family that scores this checkpoint the way sentence-transformers does (see the module doc)."""
    config = _json(options, "config.json") or {}
    architecture = (config.get("architectures") or [""])[0]
    if architecture.endswith("ForCausalLM") or has_chat_template(options):
        return SENTENCE_TRANSFORMERS
    modules = _json(options, "modules.json")
    if modules is not None and not _plain_sequence_classifier(options, modules):
        return SENTENCE_TRANSFORMERS
    return SEQUENCE_CLASSIFICATION  # a bare encoder lands here too, and is refused for its missing head


def has_chat_template(options: ModelOptions) -> bool:
    """Whether the tokenizer ships a chat template (in its config, or as ``chat_template.jinja``)."""
    return chat_template(options) is not None


def chat_template(options: ModelOptions) -> Any | None:
    """The tokenizer's chat template (from its config, else ``chat_template.jinja``); None without one."""
    tokenizer_config = _json(options, "tokenizer_config.json") or {}
    if tokenizer_config.get("chat_template"):
        return tokenizer_config["chat_template"]
    path = model_file(options, "chat_template.jinja")
    return None if path is None else Path(path).read_text()


def scoring_recipe(options: ModelOptions) -> dict[str, str | None]:
    """How the checkpoint's scores are made, for a job's manifest: its family and its chat template.

    The template is recorded as a digest (``None`` without one). The model's version already pins every
    file; this says in the manifest which template and which way of scoring a resume relies on.
    """
    template = chat_template(options)
    digest = None if template is None else hashlib.sha256(json.dumps(template).encode()).hexdigest()[:16]
    return {"family": model_family(options), "chat_template": digest}


def _plain_sequence_classifier(options: ModelOptions, modules: list[dict[str, Any]]) -> bool:
    """A sentence-transformers save of a plain text-pair classifier (what the fast path computes)."""
    if len(modules) != 1 or modules[0].get("type") not in _TRANSFORMER_MODULES or modules[0].get("path"):
        return False
    module = _json(options, "sentence_bert_config.json") or {}
    modalities = set((module.get("modality_config") or {"text": {}}).keys())
    settings = _json(options, "config_sentence_transformers.json") or {}
    return (
        module.get("transformer_task", "sequence-classification") == "sequence-classification"
        and modalities == {"text"}
        and not module.get("processing_kwargs")
        and not module.get("do_lower_case")
        and not settings.get("prompts")
    )


def _json(options: ModelOptions, name: str) -> Any | None:
    path = model_file(options, name)
    return None if path is None else json.loads(Path(path).read_text())
