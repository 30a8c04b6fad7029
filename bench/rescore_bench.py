"""The job against sentence-transformers, in ONE run, on the same N pairs of realistic text.

(a) ``CrossEncoder.predict`` (default batch size), (b) the model class in-process
(``CrossEncoderModel.score``), (c) the Ray Data job end to end as a user runs it (``python -m
jobs.rescore`` as a subprocess, Ray start-up included), (d) the same job on the same pairs split into
many small files (``--small-files``, default 200: the unit-packing case). Prints one JSON object.

    python -m bench.rescore_bench [--pairs 100000] [--files 10] [--small-files 200] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.harness import run_job, write_pairs
from tests.helpers import TWIN_MODEL


def time_cross_encoder(model: str, table: pa.Table) -> tuple[dict[str, Any], np.ndarray]:
    """(a): sentence-transformers' CrossEncoder.predict with its default batch size, raw logits."""
    import torch
    from sentence_transformers import CrossEncoder

    encoder = CrossEncoder(model, activation_fn=torch.nn.Identity())
    pairs = list(zip(table["query"].to_pylist(), table["passage"].to_pylist(), strict=True))
    encoder.predict(pairs[:64])
    started = time.perf_counter()
    scores = np.asarray(encoder.predict(pairs), dtype=np.float32)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "pairs_per_s": round(len(pairs) / seconds, 1)}, scores


def time_model_class(model: str, table: pa.Table) -> tuple[dict[str, Any], np.ndarray]:
    """(b): CrossEncoderModel.score on every pair (tokenize, length-aware batches, forward)."""
    import torch

    from reranker.model import CrossEncoderModel

    scorer = CrossEncoderModel(model)
    queries, passages = table["query"].to_pylist(), table["passage"].to_pylist()
    scorer.score(queries[:64], passages[:64])
    started = time.perf_counter()
    tokenized = scorer.tokenize(queries, passages)
    tokenize_s = time.perf_counter() - started
    scores = scorer.score_encoded(tokenized)
    seconds = time.perf_counter() - started
    lengths = tokenized.lengths
    padded = padded_tokens(lengths, scorer.max_batch_tokens, scorer.settings.max_batch_pairs)
    return {
        "seconds": round(seconds, 2),
        "pairs_per_s": round(len(queries) / seconds, 1),
        "tokenize_share": round(tokenize_s / seconds, 3),
        "torch_threads": torch.get_num_threads(),
        "max_batch_tokens": scorer.max_batch_tokens,
        "mean_tokens_per_pair": round(float(lengths.mean()), 1),
        "padding_overhead": round(padded / float(lengths.sum()), 4),
    }, scores


def padded_tokens(lengths: np.ndarray, max_batch_tokens: int, max_batch_pairs: int) -> int:
    """Tokens the forward passes process, padding included."""
    from reranker.batching import plan_batches

    return sum(
        len(batch) * int(lengths[batch].max())
        for batch in plan_batches(lengths, max_batch_tokens, max_batch_pairs)
    )


def time_job(
    model: str, input_dir: Path, output_dir: Path, extra: list[str]
) -> tuple[dict[str, Any], np.ndarray]:
    """(c): ``python -m jobs.rescore`` end to end; scores read back in ``pid`` order."""
    args = ["--input", str(input_dir), "--output", str(output_dir), "--model", model, "--overwrite", *extra]
    result = run_job(args)
    num_pairs = pq.ParquetDataset(str(input_dir)).read(columns=["pid"]).num_rows
    stages = result.pop("stage_seconds")
    wall = result["wall_s"]
    startup = max(0.0, stages.get("first_forward_at", 0.0) - result.pop("started_at"))
    result.update(
        pairs_per_s=round(num_pairs / wall, 1),
        share_of_wall={
            "startup_until_first_forward": round(startup / wall, 3),
            "read": round(stages.get("read_s", 0.0) / wall, 3),
            "tokenize": round(stages.get("tokenize_s", 0.0) / wall, 3),
            "forward": round(stages.get("forward_s", 0.0) / wall, 3),
            "write": round(stages.get("write_s", 0.0) / wall, 3),
        },
        note="shares are task seconds / wall; tokenization runs beside the forward pass, so they overlap",
    )
    output = pq.read_table(output_dir, columns=["pid", "score"]).sort_by("pid")
    return result, output["score"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--model", default=str(TWIN_MODEL))
    parser.add_argument("--job-args", default="", help="extra job flags, e.g. '--rows-per-unit 20000'")
    parser.add_argument(
        "--small-files",
        type=int,
        default=200,
        help="also run the job on the same pairs in this many files (0: no)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="rescore-bench-") as workdir:
        input_dir = Path(workdir) / "in"
        write_pairs(input_dir, args.pairs, args.files)
        table = pq.ParquetDataset(str(input_dir)).read().sort_by("pid")
        predict, predict_scores = time_cross_encoder(args.model, table)
        in_process, in_process_scores = time_model_class(args.model, table)
        job, job_scores = time_job(args.model, input_dir, Path(workdir) / "out", args.job_args.split())
        small = None
        if args.small_files:
            small_dir = split_into_files(table, Path(workdir) / "small", args.small_files)
            small, small_scores = time_job(
                args.model, small_dir, Path(workdir) / "out-small", args.job_args.split()
            )
    report: dict[str, Any] = {
        "pairs": args.pairs,
        "files": args.files,
        "cpus": os.cpu_count(),
        "model": args.model,
        "a_cross_encoder_predict": predict,
        "b_model_in_process": in_process,
        "c_job_end_to_end": job,
        "ratio_b_over_a": round(in_process["pairs_per_s"] / predict["pairs_per_s"], 3),
        "ratio_c_over_a": round(job["pairs_per_s"] / predict["pairs_per_s"], 3),
        "max_abs_diff_b_vs_a": float(np.max(np.abs(in_process_scores - predict_scores))),
        "max_abs_diff_c_vs_a": float(np.max(np.abs(job_scores - predict_scores))),
    }
    if small is not None:
        report |= {
            "d_job_many_small_files": {"files": args.small_files, **small},
            "ratio_d_over_a": round(small["pairs_per_s"] / predict["pairs_per_s"], 3),
            "ratio_d_over_c": round(small["pairs_per_s"] / job["pairs_per_s"], 3),
            "max_abs_diff_d_vs_a": float(np.max(np.abs(small_scores - predict_scores))),
        }
    print(json.dumps(report, indent=2))


def split_into_files(table: pa.Table, directory: Path, num_files: int) -> Path:
    """The same pairs as ``num_files`` Parquet files (the many-small-files shape)."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, num_files + 1).astype(int)
    for index in range(num_files):
        piece = table.slice(int(bounds[index]), int(bounds[index + 1] - bounds[index]))
        pq.write_table(piece, directory / f"pairs-{index:05d}.parquet")
    return directory


if __name__ == "__main__":
    main()
