"""The cascade trade-off curve, in ONE run on this machine: quality per k, and what it costs, job and service.

Quality (trained weights on both stages, our own small models, see ../shared/README.md; not the
published ones): stage 1 ``minilm-l2-lexical``, stage 2 ``minilm-l6-lexical`` on the DL19 and DL20 BM25
top-100. Each model scores every row once (stage 2 through the job, ``python -m jobs.rescore``, whose
run is also the speed baseline; stage 1 with the model class in-process, which the tests prove gives
the job's scores); the cascade at each k is then formed with the job's own functions
(``reranker.cascade``: each query's best k by stage 1, ordered by stage 2 above the rest), which the
tests prove equal to running the cascade job, and
evaluated with ``jobs.evaluate`` (nDCG@10, MRR@10): k in {5, 10, 20, 50, 100}, stage 1 alone, stage 2
alone. The chosen k is the smallest within 0.01 nDCG@10 of stage 2 alone on both years.

Speed at that k, with the TinyBERT twin as stage 1 (the seed model's exact cost; its scores are random,
so no quality figure for it): the cascade job against stage 2 alone on the same DL19+DL20 rows (wall
clock, Ray start-up included), and the service (``serve run``) at c=1 (p50 of a 100-candidate request)
and c=8 (pairs/s) against stage 2 alone, in both cascade layouts. Prints one JSON object.

    python -m bench.cascade [--ks 5,10,20,50,100] [--requests 16]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from bench.harness import ROOT, run_job
from bench.serve_load import run_level, start_server
from jobs.evaluate import evaluate
from jobs.settings import EvaluateSettings
from reranker.cascade import cascade_order, top_candidates
from tests.helpers import DL19_QRELS, DL19_TSV, DL20_QRELS, DL20_TSV, SHARED, TWIN_MODEL, read_trec_tsv

STAGE1 = SHARED / "models" / "minilm-l2-lexical"
STAGE2 = SHARED / "models" / "minilm-l6-lexical"
YEARS = {"dl19": (DL19_TSV, DL19_QRELS), "dl20": (DL20_TSV, DL20_QRELS)}
URL = "http://127.0.0.1:8000"  # the port in configs/serve.yaml


def write_input(directory: Path) -> Path:
    """DL19 and DL20 as one Parquet input (qid, pid, query, passage, year); 97 queries x 100."""
    frames = [read_trec_tsv(tsv).assign(year=year) for year, (tsv, _) in YEARS.items()]
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(pd.concat(frames, ignore_index=True)), directory / "dl.parquet")
    return directory


def score_with_job(
    model: Path, source: Path, output: Path, *extra: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every row scored by one model through the job; the scores and the job's timing."""
    args = ["--input", str(source), "--output", str(output), "--model", str(model), "--overwrite", *extra]
    timing = run_job(args)
    return pq.read_table(output).to_pandas(), timing


def score_in_process(model: Path, source: Path) -> pd.DataFrame:
    """Every row scored by the model class in this process (the job's scores, without Ray's start-up)."""
    from reranker.model import CrossEncoderModel

    frame = pq.read_table(source).to_pandas()
    scorer = CrossEncoderModel(str(model), torch_threads=os.cpu_count())
    return frame.assign(score=scorer.score(frame["query"].tolist(), frame["passage"].tolist()).scores)


def cascade_ranks(frame: pd.DataFrame, k: int | None) -> pd.DataFrame:
    """Each query's 1-based rank under a cascade with ``k`` (None: stage 2 alone; 0: stage 1 alone)."""
    ranked = []
    for _, group in frame.groupby("qid", sort=False):
        first, second = group["stage1"].to_numpy(), group["stage2"].to_numpy()
        positions = np.arange(len(group))
        if k == 0:
            stage_scores = [first]
        else:
            reached = np.full(len(group), np.nan)
            chosen = top_candidates(first, len(group) if k is None else k, positions)
            reached[chosen] = second[chosen]
            stage_scores = [first, reached] if k is not None else [second]
        order, _, _ = cascade_order(stage_scores, positions)
        ranks = np.empty(len(group), dtype=np.int64)
        ranks[order] = np.arange(1, len(group) + 1)
        ranked.append(group.assign(rank=ranks))
    return pd.concat(ranked)


def quality(frame: pd.DataFrame, k: int | None, workdir: Path) -> dict[str, dict[str, float]]:
    """nDCG@10 and MRR@10 per year of one cascade setting, through jobs.evaluate."""
    ranked = cascade_ranks(frame, k)
    result = {}
    for year, (_, qrels) in YEARS.items():
        path = workdir / f"ranked-{year}-{k}.parquet"
        table = ranked[ranked["year"] == year][["qid", "pid", "rank"]]
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)
        settings = EvaluateSettings.load(scores=str(path), qrels=str(qrels), rank_column="rank")
        measured = evaluate(settings)
        result[year] = {name: round(float(measured[name]), 4) for name in ("ndcg@10", "mrr@10")}
    return result


def choose_k(curve: dict[str, Any], ks: list[int]) -> int | None:
    """The smallest k whose nDCG@10 is within 0.01 of stage 2 alone on both years."""
    alone = curve["stage2_alone"]
    for k in ks:
        if all(alone[year]["ndcg@10"] - curve[f"k={k}"][year]["ndcg@10"] <= 0.01 for year in YEARS):
            return k
    return None


def cascade_flag(stage1: Path, k: int) -> str:
    return json.dumps([{"model": str(stage1), "rerank_count": k}, {"model": str(STAGE2)}])


def job_speed(source: Path, workdir: Path, k: int, stage2_timing: dict[str, Any]) -> dict[str, Any]:
    """The twin + stage 2 cascade job at k against stage 2 alone (already run) on the same rows."""
    rows = pq.ParquetFile(source / "dl.parquet").metadata.num_rows
    args = ["--input", str(source), "--output", str(workdir / "cascade"), "--group-column", "qid"]
    timing = run_job([*args, "--cascade", cascade_flag(TWIN_MODEL, k), "--overwrite"])
    rates = {
        name: round(rows / t["wall_s"], 1) for name, t in (("cascade", timing), ("stage2", stage2_timing))
    }
    return {
        "rows": rows,
        "cascade": {"wall_s": timing["wall_s"], "rows_per_s": rates["cascade"], "summary": timing["summary"]},
        "stage2_alone": {"wall_s": stage2_timing["wall_s"], "rows_per_s": rates["stage2"]},
        "throughput_vs_stage2_alone": round(rates["cascade"] / rates["stage2"], 2),
    }


def serve_config(workdir: Path, name: str, layout: str | None, k: int) -> Path:
    """configs/serve.yaml for one variant: stage 2 alone, or the cascade in a layout (2 cores here)."""
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    app = config["applications"][0]
    app["args"] = {"model": str(STAGE2), "max_documents": 1000}
    if layout is not None:
        app["args"] |= {"cascade": json.loads(cascade_flag(TWIN_MODEL, k)), "cascade_layout": layout}
    if layout == "deployment_per_stage":  # the ingress loads no model: the cores go to the stages
        app["deployments"][0]["ray_actor_options"] = {"num_cpus": 0.2}
        app["deployments"] += [
            {"name": f"RerankStage_stage{n}", "ray_actor_options": {"num_cpus": 0.9}} for n in (1, 2)
        ]
    path = workdir / f"serve-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def service_speed(workdir: Path, k: int, requests: int) -> dict[str, Any]:
    """c=1 p50 (``requests`` // 2 requests) and c=8 pairs/s (``requests``) of 100-candidate DL19 requests."""
    frame = read_trec_tsv(DL19_TSV)
    groups = [(g["query"].iloc[0], g["passage"].tolist()) for _, g in frame.groupby("qid", sort=False)]
    bodies = [json.dumps({"query": q, "documents": p, "top_n": 10}).encode() for q, p in groups]
    sizes = [len(p) for _, p in groups]
    report: dict[str, Any] = {}
    for name, layout in (
        ("stage2_alone", None),
        ("one_replica", "one_replica"),
        ("per_stage", "deployment_per_stage"),
    ):
        server = start_server(str(STAGE2), URL, config=serve_config(workdir, name, layout, k))
        try:
            run_level(URL, bodies[:2], sizes[:2], 1, 2)  # warm the path
            levels = [
                run_level(URL, bodies, sizes, 1, requests // 2),
                run_level(URL, bodies, sizes, 8, requests),
            ]
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
        report[name] = {"c1_p50_ms": levels[0]["p50_ms"], "c8_pairs_per_s": levels[1]["pairs_per_s"],
                        "errors": {**levels[0]["errors"], **levels[1]["errors"]}}  # fmt: skip
    alone = report["stage2_alone"]
    for name in ("one_replica", "per_stage"):
        report[name]["c1_p50_vs_stage2_alone"] = round(report[name]["c1_p50_ms"] / alone["c1_p50_ms"], 3)
        report[name]["c8_throughput_vs_stage2_alone"] = round(
            report[name]["c8_pairs_per_s"] / alone["c8_pairs_per_s"], 2
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="5,10,20,50,100", help="rerank counts of the curve")
    parser.add_argument("--requests", type=int, default=16, help="requests per service level")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ks = [int(k) for k in args.ks.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cascade-bench-") as tmp:
        workdir = Path(tmp)
        source = write_input(workdir / "in")
        first = score_in_process(STAGE1, source)
        # Stage 2 alone reranks as a user would (ranked per query), so it pays the shuffle a cascade pays.
        second, stage2_timing = score_with_job(
            STAGE2, source, workdir / "stage2", "--group-column", "qid", "--rank"
        )
        second = second[["qid", "pid", "score"]].rename(columns={"score": "stage2"})
        frame = first.rename(columns={"score": "stage1"}).merge(second, on=["qid", "pid"])  # input order
        curve = {"stage1_alone": quality(frame, 0, workdir), "stage2_alone": quality(frame, None, workdir)}
        curve |= {f"k={k}": quality(frame, k, workdir) for k in ks}
        chosen = choose_k(curve, ks)
        speed_k = chosen if chosen is not None else ks[len(ks) // 2]
        report: dict[str, Any] = {
            "models": {"stage1_quality": STAGE1.name, "stage2": STAGE2.name, "stage1_speed": TWIN_MODEL.name},
            "note": "our own small models (../shared/README.md), not the published ones; the twin's "
            "scores are random, so it has no quality figure",
            "quality": curve,
            "chosen_k": chosen,
            "speed_at_k": speed_k,
            "job": job_speed(source, workdir, speed_k, stage2_timing),
            "service": service_speed(workdir, speed_k, args.requests),
            "cpus": os.cpu_count(),
        }
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
