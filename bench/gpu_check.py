"""The model class on a GPU: fp32 vs fp16/bf16 scores and pairs/s, with the pinned-memory copies.

Builds a randomly initialised model with TinyBERT-L2's shape (hidden 128, 2 layers, 2 heads) and a
WordPiece tokenizer in a temp dir (no hub, no ../shared), scores N pairs of ~96 tokens at each
precision, with the last layer at [CLS] only (the default) and with the full forward, and prints JSON.
Needs CUDA.

    python -m bench.gpu_check [--pairs 200000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reranker.model import CrossEncoderModel
from reranker.settings import ModelSettings
from tests.helpers import build_tiny_cross_encoder


def tinybert_shaped(directory: Path) -> Path:
    """A random model with TinyBERT-L2's layer shapes, and the helper's WordPiece tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    build_tiny_cross_encoder(directory, max_position=512)
    config = BertConfig.from_pretrained(directory)
    shape = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}
    config.update(shape)
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def time_scoring(
    scorer: CrossEncoderModel, queries: list[str], passages: list[str]
) -> tuple[float, np.ndarray, dict[str, object]]:
    """Seconds of the forward passes over pre-tokenized pairs (after a warm-up run), scores, details."""
    encoded = scorer.tokenize(queries, passages)
    scorer.score_encoded(encoded)  # warm-up: kernels and shapes
    torch.cuda.synchronize()
    started = time.perf_counter()
    scores = scorer.score_encoded(encoded)
    torch.cuda.synchronize()
    details = {
        "max_batch_tokens": scorer.max_batch_tokens,
        "mean_tokens_per_pair": round(float(encoded.lengths.mean()), 1),
        "pinned_copies": scorer._pin_memory,
    }
    return time.perf_counter() - started, scores, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    words = ["solar", "panel", "energy", "wind", "river", "season", "orbit", "water", "basil", "tide"]
    queries = [" ".join(rng.choice(words, 6)) for _ in range(args.pairs)]
    passages = [" ".join(rng.choice(words, 88)) for _ in range(args.pairs)]
    report: dict[str, object] = {"device": torch.cuda.get_device_name(0), "pairs": args.pairs}
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = tinybert_shaped(Path(workdir))
        reference = None
        for precision in ("fp32", "fp16", "bf16"):
            for cls_only in (True, False):
                settings = ModelSettings(
                    model=str(model_dir), device="cuda", precision=precision, cls_only_last_layer=cls_only
                )
                seconds, scores, details = time_scoring(
                    CrossEncoderModel.from_settings(settings), queries, passages
                )
                reference = scores if reference is None else reference
                key = precision if cls_only else f"{precision}_full_forward"
                report[key] = {
                    "forward_pairs_per_s": round(args.pairs / seconds),
                    "max_abs_diff_vs_fp32": float(np.max(np.abs(scores - reference))),
                    **details,
                }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
