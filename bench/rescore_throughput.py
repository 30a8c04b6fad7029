"""Offline throughput: the rescoring job vs CrossEncoder.predict on the same pairs, in one run.

Prints JSON. Default pairs: DL19 + DL20 BM25 top-100 (9,700 pairs) from ../shared.

    python bench/rescore_throughput.py [--model ../shared/models/tinybert-l2-twin] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import DL19_TSV, DL20_TSV, TWIN_MODEL, read_trec_tsv  # noqa: E402


def load_pairs() -> pd.DataFrame:
    return pd.concat([read_trec_tsv(DL19_TSV), read_trec_tsv(DL20_TSV)], ignore_index=True)


def time_cross_encoder(model: str, pairs: pd.DataFrame, batch_size: int) -> dict:
    import torch
    from sentence_transformers import CrossEncoder

    encoder = CrossEncoder(model, activation_fn=torch.nn.Identity())
    items = list(zip(pairs["query"], pairs["passage"], strict=True))
    encoder.predict(items[:64])
    started = time.perf_counter()
    encoder.predict(items, batch_size=batch_size)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "pairs_per_s": round(len(items) / seconds, 1),
        "batch_size": batch_size,
    }


def time_model_in_process(model: str, pairs: pd.DataFrame) -> dict:
    from reranker.model import CrossEncoderModel
    from reranker.settings import ModelSettings

    scorer = CrossEncoderModel(ModelSettings(model=model))
    scorer.score(["warm"], ["up"])
    started = time.perf_counter()
    scorer.score(pairs["query"].tolist(), pairs["passage"].tolist())
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "pairs_per_s": round(len(pairs) / seconds, 1)}


def time_job(model: str, pairs: pd.DataFrame, workdir: Path) -> dict:
    pairs.to_parquet(workdir / "pairs.parquet", index=False)
    command = [
        sys.executable,
        "-m",
        "jobs.rescore",
        "--input",
        str(workdir / "pairs.parquet"),
        "--output",
        str(workdir / "out"),
        "--model",
        model,
        "--overwrite",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    summary = done.stdout.strip().splitlines()[-1]
    executed = re.findall(r"execution finished in ([0-9.]+) seconds", done.stderr)
    result = {
        "process_seconds": round(seconds, 3),
        "summary": summary,
        "pairs_per_s_end_to_end": round(len(pairs) / seconds, 1),
    }
    if executed:
        result["dataset_execution_seconds"] = float(executed[-1])
        result["pairs_per_s_dataset_execution"] = round(len(pairs) / float(executed[-1]), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TWIN_MODEL))
    parser.add_argument("--batch-size", type=int, default=32, help="CrossEncoder.predict batch size")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pairs = load_pairs()
    with tempfile.TemporaryDirectory() as workdir:
        report = {
            "pairs": len(pairs),
            "cpus": os.cpu_count(),
            "model": args.model,
            "cross_encoder_predict": time_cross_encoder(args.model, pairs, args.batch_size),
            "model_in_process": time_model_in_process(args.model, pairs),
            "job": time_job(args.model, pairs, Path(workdir)),
        }
    base = report["cross_encoder_predict"]["pairs_per_s"]
    report["ratio_job_end_to_end_vs_predict"] = round(report["job"]["pairs_per_s_end_to_end"] / base, 3)
    report["ratio_in_process_vs_predict"] = round(report["model_in_process"]["pairs_per_s"] / base, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
