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


SPREAD_QUERY = "how do solar panels work"
SPREAD_PASSAGES = [
    "solar panels convert sunlight",
    "bananas are yellow",
    "the sun makes energy",
    "python language",
    "what causes seasons",
    "water basil when dry",
]
MIN_SCORE_GAP = 1e-3  # 100x the loosest score tolerance the tests use (1e-5)


def build_tiny_cross_encoder(
    directory: Path,
    num_labels: int = 1,
    max_position: int = 64,
    seed: int = 0,
    layers: int = 1,
    logit_offset: float = 0.0,
) -> Path:
    """Save a randomly initialised BERT cross-encoder (1 layer by default) and its WordPiece tokenizer.

    Its weights are drawn wide enough (``initializer_range`` 0.2) that distinct pairs score far apart
    (checked here), so a permutation of scores can never pass a test's equality check. ``logit_offset``
    is added to the head's bias (e.g. -40: logits where a float32 sigmoid is 0).
    """
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
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position,
        num_labels=num_labels,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    _assert_scores_spread(model, tokenizer)
    with torch.no_grad():
        model.classifier.bias += logit_offset
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _assert_scores_spread(model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import torch

    inputs = tokenizer(
        [SPREAD_QUERY] * len(SPREAD_PASSAGES), SPREAD_PASSAGES, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    scores = (logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]).numpy()
    gap = float(np.min(np.diff(np.sort(scores))))
    assert gap > MIN_SCORE_GAP, f"the tiny model's scores are too close to tell apart (min gap {gap:.2e})"


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


def build_headless_checkpoint(directory: Path, kind: str) -> Path:
    """A checkpoint with the tiny model's tokenizer but no classification head.

    ``kind`` "bare-encoder" saves a ``BertModel``; "causal-lm" a small Qwen3 language model (as a
    Qwen3-Reranker checkpoint is): transformers would give either a random head.
    """
    import shutil
    import tempfile

    from transformers import BertModel, Qwen3Config, Qwen3ForCausalLM

    source = build_tiny_cross_encoder(Path(tempfile.mkdtemp()))
    shutil.copytree(source, directory)
    (directory / "model.safetensors").unlink()
    if kind == "bare-encoder":
        from transformers import AutoConfig

        BertModel(AutoConfig.from_pretrained(source)).save_pretrained(directory)
    else:
        config = Qwen3Config(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            pad_token_id=0,
        )
        Qwen3ForCausalLM(config).save_pretrained(directory)
    shutil.rmtree(source)
    return directory


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path, commit: str) -> Path:
    """Lay ``model_dir`` out as the hub cache holds ``repo_id`` at ``commit``, with ``main`` pointing there.

    With ``HF_HUB_CACHE=cache`` and ``HF_HUB_OFFLINE=1``, loading ``repo_id`` reads these files: a hub
    model whose ``main`` can be moved by calling this again with another commit.
    """
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


QUERIES = ["how do solar panels work", "what causes seasons", "basil plant water"]
PASSAGES = ["solar panels convert sunlight", "the tilt of the earth axis", "water basil when dry", "bananas"]


def pairs_table(copies: int = 1):  # type: ignore[no-untyped-def]
    """Every (query, passage) combination with qid/pid/lang columns, ``copies`` times."""
    import pyarrow as pa

    rows = [
        {"qid": q, "pid": q * 10 + p, "query": query, "passage": passage, "lang": "en"}
        for _ in range(copies)
        for q, query in enumerate(QUERIES)
        for p, passage in enumerate(PASSAGES)
    ]
    return pa.Table.from_pylist(rows)


def damage_data_page(path: Path) -> None:
    """Overwrite bytes inside the first column chunk of a Parquet file, leaving the footer valid."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    start = metadata.row_group(0).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 8 : start + 40] = b"\xff" * 32
    path.write_bytes(bytes(data))


# A Qwen3-Reranker-style template: query, document and system (the instruction) roles.
LLM_RERANKER_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    '<Instruct>: {{ messages | selectattr("role", "eq", "system") | map(attribute="content") | first'
    ' | default("Given a web search query, retrieve relevant passages that answer the query") }}\n'
    '<Query>: {{ messages | selectattr("role", "eq", "query") | map(attribute="content") | first }}\n'
    '<Document>: {{ messages | selectattr("role", "eq", "document") | map(attribute="content") | first }}'
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
PLAIN_CHAT_TEMPLATE = (  # a chat model's template: system / user / assistant only, no query or document
    "{% for message in messages %}{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "<|im_start|>assistant\n"
)


def build_llm_tokenizer(template: str = LLM_RERANKER_TEMPLATE):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer (as Qwen's) trained on a few lines, with ``yes`` / ``no`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["yes", "no", "yes no", "Judge whether the Document meets the requirements", *QUERIES, *PASSAGES]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", model_max_length=256
    )
    tokenizer.chat_template = template
    assert {"yes", "no"} <= set(tokenizer.get_vocab())
    return tokenizer


def _qwen3_config(tokenizer, **extra):  # type: ignore[no-untyped-def]
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
        **extra,
    )


def build_tiny_llm_reranker(
    directory: Path, st_save: bool = True, template: str = LLM_RERANKER_TEMPLATE, seed: int = 0
) -> Path:
    """A Qwen3-style causal-LM yes/no reranker: saved by sentence-transformers (Transformer + LogitScore,
    as Qwen3-Reranker's sentence-transformers revision is), or as a plain Hugging Face checkpoint with its
    chat template (as the original repository is, which sentence-transformers reads with yes / no)."""
    import torch
    from transformers import Qwen3ForCausalLM

    tokenizer = build_llm_tokenizer(template)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(_qwen3_config(tokenizer, tie_word_embeddings=True)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if st_save:
        from sentence_transformers import CrossEncoder

        CrossEncoder(str(directory)).save_pretrained(str(directory))
    return directory


def build_tiny_templated_classifier(directory: Path, seed: int = 0) -> Path:
    """A converted Qwen3 sequence classifier (one label) that still expects the reranker's chat template."""
    import torch
    from transformers import Qwen3ForSequenceClassification

    tokenizer = build_llm_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3ForSequenceClassification(_qwen3_config(tokenizer, num_labels=1)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_xlmr_classifier(directory: Path, seed: int = 0) -> Path:
    """An XLM-R sequence classifier (one label) with a Unigram tokenizer and XLM-R's pair format."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForSequenceClassification

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = [(token, 0.0) for token in specials] + [(f"▁{word}", -1.0) for word in WORDS]
    pieces += [(char, -5.0) for char in string.ascii_lowercase + string.digits + string.punctuation + "▁"]
    backend = Tokenizer(models.Unigram(pieces, unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        pad_token="<pad>", unk_token="<unk>", model_max_length=64,
    )  # fmt: skip
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=70, num_labels=1, pad_token_id=1, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = XLMRobertaForSequenceClassification(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_modular_cross_encoder(directory: Path, seed: int = 0) -> Path:
    """A modular sentence-transformers cross-encoder, Transformer -> Pooling (CLS) -> Dense (1 score), over
    the tiny BERT's encoder, saved by sentence-transformers (as the ettin rerankers are: no classifier)."""
    import tempfile

    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    encoder = Transformer(
        str(build_tiny_cross_encoder(Path(tempfile.mkdtemp()))), transformer_task="feature-extraction"
    )
    size = encoder.get_embedding_dimension()
    dense = Dense(size, 1, activation_function=None, module_output_name="scores")
    torch.manual_seed(seed)
    torch.nn.init.normal_(dense.linear.weight, std=0.5)
    CrossEncoder(modules=[encoder, Pooling(size, pooling_mode="cls"), dense]).save_pretrained(str(directory))
    return directory
