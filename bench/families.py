"""Every model family's speed: our class against sentence-transformers' CrossEncoder.predict, and the job.

For each family the bench builds a tiny model (tests.helpers: random weights, so the figures are for
shape, not for any published model's speed), scores the same recombined DL19/DL20 pairs with
``CrossEncoder.predict`` (its default batch size, 32) and with ``CrossEncoderModel.predict``
(length-sorted token-budget batches), checks that they agree, then runs the job end to end on them.

    python -m bench.families [--pairs 2000] [--job-pairs 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.harness import recombined_pairs, run_job
from reranker.model import CrossEncoderModel
from tests.helpers import (
    build_tiny_cross_encoder,
    build_tiny_llm_reranker,
    build_tiny_modular_cross_encoder,
    build_tiny_templated_classifier,
    build_tiny_xlmr_classifier,
)

FAMILIES: dict[str, Callable[[Path], Path]] = {
    "bert-sequence-classification": lambda d: build_tiny_cross_encoder(d, max_position=512, layers=2),
    "xlm-r-sequence-classification": build_tiny_xlmr_classifier,
    "modular-transformer-pooling-dense": build_tiny_modular_cross_encoder,
    "llm-yes-no (qwen3-style)": build_tiny_llm_reranker,
    "templated-classifier (qwen3-style)": build_tiny_templated_classifier,
}


def best_rate(score: Callable[[], np.ndarray], pairs: int, repeats: int) -> tuple[float, np.ndarray]:
    """The best pairs/s of ``repeats`` calls (the first one warms up, untimed), and the scores."""
    scores = score()
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        scores = score()
        rates.append(pairs / (time.perf_counter() - started))
    return max(rates), scores


def measure(name: str, directory: Path, pairs: list[tuple[str, str]], repeats: int) -> dict[str, Any]:
    """One family: both libraries' pairs/s on the same pairs, and their largest score difference."""
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(directory))
    ours = CrossEncoderModel(str(directory))
    identity = torch.nn.Identity()
    theirs_rate, theirs = best_rate(
        lambda: reference.predict(pairs, activation_fn=identity), len(pairs), repeats
    )
    ours_rate, scores = best_rate(lambda: ours.predict(pairs), len(pairs), repeats)
    return {
        "family": name,
        "kind": ours.kind,
        "tokens_per_pair_mean": round(float(ours.tokenize(*zip(*pairs, strict=True)).lengths.mean()), 1),
        "cross_encoder_predict_pairs_per_s": round(theirs_rate, 1),
        "ours_pairs_per_s": round(ours_rate, 1),
        "ratio": round(ours_rate / theirs_rate, 3),
        "max_abs_diff": float(np.abs(scores - theirs).max()),
    }


def job_rate(directory: Path, num_pairs: int, work: Path) -> dict[str, Any]:
    """The job end to end on ``num_pairs`` pairs (one file): pairs/s to its summary line."""
    pq.write_table(recombined_pairs(num_pairs, seed=7), work / "in.parquet")
    run = run_job(
        ["--model", str(directory), "--input", str(work / "in.parquet"), "--output", str(work / "out")]
    )
    seconds = run["summary_line_s"] or run["wall_s"]
    return {
        "job_pairs": num_pairs,
        "job_summary_line_s": seconds,
        "job_pairs_per_s": round(num_pairs / seconds, 1),
    }


def main() -> None:
    """Build, measure and print one JSON line per family, then a summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--job-pairs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    table = recombined_pairs(options.pairs)
    pairs = list(zip(table["query"].to_pylist(), table["passage"].to_pylist(), strict=True))
    results = []
    for name, build in FAMILIES.items():
        work = Path(tempfile.mkdtemp(prefix="bench-families-"))
        directory = build(work / "model")
        row = {
            **measure(name, directory, pairs, options.repeats),
            **job_rate(directory, options.job_pairs, work),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    print(
        json.dumps(
            {"torch_threads": torch.get_num_threads(), "pairs": options.pairs, "families": len(results)}
        )
    )


if __name__ == "__main__":
    main()
