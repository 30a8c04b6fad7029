"""Does the job stay flat in memory as input grows? Runs it at several sizes; prints JSON.

For each size, builds N pairs of recombined DL19/DL20 text (``bench.harness``) as several Parquet
files, runs ``python -m jobs.rescore`` in a session of its own and samples the memory of every
process in it (driver, raylet/GCS, tokenize/commit workers, scoring actors).

    python -m bench.rescore_scale [--pairs 100000 1000000] [--rows-per-file 100000] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import run_job, write_pairs
from tests.helpers import TWIN_MODEL


def measure(num_pairs: int, rows_per_file: int, model: str, workdir: Path) -> dict[str, Any]:
    """One size: rows, files, pairs/s end to end, and peak memory of driver and workers."""
    files = max(1, -(-num_pairs // rows_per_file))
    input_dir, output_dir = workdir / f"in-{num_pairs}", workdir / f"out-{num_pairs}"
    write_pairs(input_dir, num_pairs, files)
    result = run_job(["--input", str(input_dir), "--output", str(output_dir), "--model", model])
    shutil.rmtree(input_dir)
    shutil.rmtree(output_dir)
    result.pop("started_at")
    return {
        "rows": num_pairs,
        "files": files,
        "pairs_per_s": round(num_pairs / result["wall_s"], 1),
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rows-per-file", type=int, default=100_000)
    parser.add_argument("--model", default=str(TWIN_MODEL))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="rescore-scale-") as workdir:
        runs = [measure(n, args.rows_per_file, args.model, Path(workdir)) for n in args.pairs]
    report: dict[str, Any] = {"cpus": os.cpu_count(), "model": args.model, "runs": runs}
    if len(runs) > 1:
        first, last = runs[0], runs[-1]
        report["peak_total_rss_ratio_last_vs_first"] = round(
            last["peak_total_rss_mib"] / first["peak_total_rss_mib"], 3
        )
        report["peak_total_pss_ratio_last_vs_first"] = round(
            last["peak_total_pss_mib"] / first["peak_total_pss_mib"], 3
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
