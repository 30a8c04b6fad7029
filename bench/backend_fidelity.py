"""Would a faster CPU backend keep the ranking? Speed and fidelity of int8 variants against fp32.

On ``../shared/models/minilm-l6-lexical`` (trained weights; the twin's random ones can't judge
fidelity) over the DL19 BM25 top-100 pairs: pairs/s of each variant, max abs score difference to
fp32, and Spearman's rho per query (min and mean). A backend ships only at min rho >= 0.99.

    python -m bench.backend_fidelity [--model DIR] [--pairs 4300]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from reranker.model import CrossEncoderModel
from tests.helpers import DL19_TSV, SHARED, read_trec_tsv

MINILM = SHARED / "models" / "minilm-l6-lexical"


def int8_all_linear(model: torch.nn.Module) -> torch.nn.Module:
    """Torch dynamic int8 on every Linear layer (weights int8 per tensor, activations per batch)."""
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def int8_feed_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 on the feed-forward Linears only (attention projections and the head stay fp32)."""
    names = {
        name
        for name, module in model.named_modules()
        if name.endswith(("intermediate.dense", "output.dense"))
    }
    names = {name for name in names if ".attention." not in name}
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), names, dtype=torch.qint8)


def score_with(
    scorer: CrossEncoderModel, module: torch.nn.Module, pairs: pd.DataFrame
) -> tuple[np.ndarray, float]:
    original = scorer.model
    scorer.model = module
    try:
        scorer.score(pairs["query"].tolist()[:32], pairs["passage"].tolist()[:32])
        started = time.perf_counter()
        scores = scorer.score(pairs["query"].tolist(), pairs["passage"].tolist()).scores
        return scores, len(pairs) / (time.perf_counter() - started)
    finally:
        scorer.model = original


def fidelity(pairs: pd.DataFrame, reference: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    rhos = []
    for _, rows in pairs.assign(ref=reference, new=scores).groupby("qid"):
        rhos.append(spearmanr(rows["ref"], rows["new"]).statistic)
    return {
        "max_abs_diff": round(float(np.max(np.abs(scores - reference))), 5),
        "spearman_per_query_min": round(float(np.min(rhos)), 4),
        "spearman_per_query_mean": round(float(np.mean(rhos)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MINILM))
    parser.add_argument("--pairs", type=int, default=4300)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pairs = read_trec_tsv(DL19_TSV).head(args.pairs)
    scorer = CrossEncoderModel(args.model)
    reference, fp32_rate = score_with(scorer, scorer.model, pairs)
    report: dict[str, Any] = {
        "model": args.model,
        "pairs": len(pairs),
        "fp32_pairs_per_s": round(fp32_rate, 1),
    }
    for name, convert in (("int8_all_linear", int8_all_linear), ("int8_feed_forward", int8_feed_forward)):
        scores, rate = score_with(scorer, convert(scorer.model), pairs)
        report[name] = {
            "pairs_per_s": round(rate, 1),
            "speedup": round(rate / fp32_rate, 3),
            **fidelity(pairs, reference, scores),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
