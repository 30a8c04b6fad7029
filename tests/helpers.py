"""Builders shared by the tests: a tiny cross-encoder on disk and paths into ../shared."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
TWIN_MODEL = SHARED / "models" / "tinybert-l2-twin"
DL19_TSV = SHARED / "data" / "trec-dl-2019" / "dl19-bm25-top100.tsv"
DL19_QRELS = SHARED / "data" / "trec-dl-2019" / "2019qrels-pass.txt"
DL20_TSV = SHARED / "data" / "trec-dl-2020" / "dl20-bm25-top100.tsv"
DL20_QRELS = SHARED / "data" / "trec-dl-2020" / "2020qrels-pass.txt"

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "on",
    "what",
    "how",
    "why",
    "when",
    "solar",
    "panel",
    "panels",
    "sun",
    "sunlight",
    "electricity",
    "energy",
    "cell",
    "cells",
    "seasons",
    "earth",
    "tilt",
    "axis",
    "orbit",
    "basil",
    "plant",
    "water",
    "vitamin",
    "bone",
    "pain",
    "paris",
    "tower",
    "bread",
    "flour",
    "python",
    "language",
    "fruit",
    "banana",
    "stock",
    "market",
    "moon",
    "wind",
    "turbine",
]


def build_tiny_cross_encoder(directory: Path, num_labels: int = 1, max_position: int = 64) -> Path:
    """Save a randomly initialised 1-layer BERT cross-encoder and its WordPiece tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab_list = specials + pieces + ["##" + p for p in pieces] + WORDS
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_position,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def require(path: Path) -> Path:
    """Skip the test with a clear reason when a ../shared resource is absent."""
    if not path.exists():
        pytest.skip(f"needs {path} (the shared models/data beside the repo); not present here")
    return path


def read_trec_tsv(path: Path):  # type: ignore[no-untyped-def]
    """The BM25 top-100 TSV (qid, pid, query, passage) as a DataFrame with text kept verbatim."""
    import pandas as pd

    return pd.read_csv(
        path,
        sep="\t",
        header=None,
        names=["qid", "pid", "query", "passage"],
        quoting=3,
        dtype={"qid": "int64", "pid": "int64", "query": str, "passage": str},
        keep_default_na=False,
    )
