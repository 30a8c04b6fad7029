"""A cascade in the job: stage 1 scores every row, stage 2 the best k per query; resume per stage."""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.rescore import main
from tests.integration.test_fault_tolerance import JobProcess, summary_numbers

pytestmark = pytest.mark.integration
GROUP_SIZE = 36  # 1,332 rows, qid = pid % 37: 36 rows per query


def cascade(stage1: Path, stage2: Path, k: int) -> str:
    """The --cascade flag: stage 1 passes its best k per query to stage 2."""
    return json.dumps([{"model": str(stage1), "rerank_count": k}, {"model": str(stage2)}])


def run_job(*args: str) -> int:
    return main([*args, "--group-column", "qid", "--rows-per-unit", "400"])


def by_query(path: Path) -> pa.Table:
    """The output, in its ranked order within each query, queries in id order."""
    table = pq.read_table(path)
    return table.sort_by([("qid", "ascending"), ("rank", "ascending")])


@pytest.fixture(scope="module")
def alone(tmp_path_factory, pairs, tiny_model_dir, larger_model_dir, ray_session) -> dict[str, Path]:
    """Each model of the cascade run alone on the same pairs (ranked), once for the module."""
    outputs = {}
    for name, model in (("s1", tiny_model_dir), ("s2", larger_model_dir)):
        outputs[name] = tmp_path_factory.mktemp("alone") / name
        args = ["--input", str(pairs), "--output", str(outputs[name]), "--model", str(model), "--rank"]
        assert run_job(*args) == 0
    return outputs


@pytest.mark.usefixtures("ray_session")
def test_k_equal_to_the_group_size_is_stage_2_alone(
    tmp_path, pairs, tiny_model_dir, larger_model_dir, capsys, alone
):
    """Every candidate reaches stage 2: final scores and order equal stage 2 run alone, with --rank. The
    output sits under a partition-like path (dt=.../): its files hold the input's columns and the job's,
    nothing parsed from the path."""
    flag = cascade(tiny_model_dir, larger_model_dir, GROUP_SIZE)
    output = tmp_path / "dt=2025-06-01" / "c"
    assert run_job("--input", str(pairs), "--output", str(output), "--cascade", flag) == 0
    assert "pairs per stage 1332/1332" in capsys.readouterr().out.splitlines()[0]
    ours, second = by_query(output), by_query(alone["s2"])
    added = ["score_stage1", "score_stage2", "score", "rank"]
    assert ours.column_names == [*second.column_names[:-2], *added]
    columns = [*pq.read_schema(pairs / "pairs-0.parquet").names, *added]
    files = [path for path in output.iterdir() if not path.name.startswith("_")]
    assert files and all(pq.read_schema(path).names == columns for path in files)
    assert ours.select(["qid", "pid", "rank"]).equals(second.select(["qid", "pid", "rank"]))
    np.testing.assert_allclose(ours["score"].to_numpy(), second["score"].to_numpy(), atol=1e-5)


@pytest.mark.usefixtures("ray_session")
def test_stage_scores_equal_each_model_alone_and_the_rest_keep_stage_1_order(
    tmp_path, pairs, tiny_model_dir, larger_model_dir, alone
):
    """k=5: stage-1 scores equal stage 1 alone, stage-2 scores equal stage 2 alone on the 5 best rows;
    the rest follow, in stage-1 order, with a null stage-2 score and, as final score, their stage-1 score,
    shifted by one amount per query only as far as needed to stay below the stage-2 rows."""
    k = 5
    flag = cascade(tiny_model_dir, larger_model_dir, k)
    assert run_job("--input", str(pairs), "--output", str(tmp_path / "c"), "--cascade", flag) == 0
    ours, first, second = by_query(tmp_path / "c"), by_query(alone["s1"]), by_query(alone["s2"])
    keyed = {(row["qid"], row["pid"]): row for row in ours.to_pylist()}
    for row in first.to_pylist():
        assert keyed[row["qid"], row["pid"]]["score_stage1"] == pytest.approx(row["score"], abs=1e-5)
    second_scores = {(row["qid"], row["pid"]): row["score"] for row in second.to_pylist()}
    for qid in range(37):
        group = [row for row in ours.to_pylist() if row["qid"] == qid]
        stage1_order = [row["pid"] for row in first.to_pylist() if row["qid"] == qid]
        top, rest = group[:k], group[k:]
        assert {row["pid"] for row in top} == set(stage1_order[:k])  # stage 1's best k reached stage 2
        assert [row["score_stage2"] for row in top] == sorted((r["score_stage2"] for r in top), reverse=True)
        for row in top:
            assert row["score_stage2"] == pytest.approx(second_scores[qid, row["pid"]], abs=1e-5)
            assert row["score"] == row["score_stage2"]
        assert [row["pid"] for row in rest] == stage1_order[k:]  # below, in stage-1 order
        assert all(row["score_stage2"] is None for row in rest)
        shifts = {round(row["score_stage1"] - row["score"], 4) for row in rest}
        assert len(shifts) == 1 and shifts.pop() >= 0 and rest[0]["score"] < top[-1]["score"]
        if rest[0]["score_stage1"] < top[-1]["score"]:  # already below: not moved
            assert all(row["score"] == row["score_stage1"] for row in rest)
        assert [row["rank"] for row in group] == list(range(1, len(group) + 1))
        scores = [row["score"] for row in group]  # the reported score follows the rank
        assert all(a >= b for a, b in itertools.pairwise(scores))


def test_a_bad_cascade_is_one_line(tmp_path, pairs, tiny_model_dir, larger_model_dir, capsys, caplog):
    """No group column, k < 1, an unknown model, one stage: one line, exit 2; costlier first: a warning."""
    good = cascade(tiny_model_dir, larger_model_dir, 5)
    bad = {
        "needs --group-column": ["--cascade", good],
        "rerank_count": ["--group-column", "qid", "--cascade", cascade(tiny_model_dir, larger_model_dir, 0)],
        "no-such-model": [
            "--group-column",
            "qid",
            "--cascade",
            cascade(tmp_path / "no-such-model", larger_model_dir, 5),
        ],
        "2 or more stages": [
            "--group-column",
            "qid",
            "--cascade",
            json.dumps([{"model": str(tiny_model_dir)}]),
        ],
    }
    for message, args in bad.items():
        capsys.readouterr()
        assert main(["--input", str(pairs), "--output", str(tmp_path / "out"), *args]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
    from jobs.rescore import check_stages
    from jobs.settings import RescoreSettings

    reversed_cascade = cascade(larger_model_dir, tiny_model_dir, 5)
    settings = RescoreSettings.load(group_column="qid", cascade=json.loads(reversed_cascade))
    with caplog.at_level(logging.WARNING, logger="reranker.cascade"):
        check_stages(settings.stages)
    assert "costs more per pair than stage stage2" in caplog.text


def test_sigkill_during_stage_2_then_rerun_does_not_redo_stage_1(
    tmp_path, pairs, tiny_model_dir, larger_model_dir
):
    """Kill the job once stage 2 has committed a unit; the rerun keeps stage 1's units and the selection,
    scores only stage 2's missing units, and writes every row once."""
    output = tmp_path / "out"
    args = [
        "--input", str(pairs), "--output", str(output), "--group-column", "qid", "--rows-per-unit", "100",
        "--cascade", cascade(tiny_model_dir, larger_model_dir, 5),
    ]  # fmt: skip
    first = JobProcess(args, tmp_path / "first.log")
    first.wait_until(lambda: any((output / "_scored2").glob("part-*.parquet")), timeout_s=240)
    first.kill_group()
    units = int(re.search(r"(\d+) units, 0 already committed", first.log.read_text()).group(1))  # type: ignore[union-attr]
    stage2_done = len(list((output / "_scored2").glob("part-*.parquet")))
    stage2_units = int(re.search(r"stage 2: (\d+) units", first.log.read_text()).group(1))  # type: ignore[union-attr]
    assert len(list((output / "_scored").glob("part-*.parquet"))) == units
    assert (output / "_select2" / "_DONE").exists() and stage2_done < stage2_units, "the kill came too late"
    text = JobProcess(args, tmp_path / "second.log").finish()
    assert f"{units} units, {units} already committed, 0 to score" in text  # stage 1: nothing scored again
    assert "_select2 is complete; kept" in text
    assert f"stage 2: {stage2_units} units, {stage2_done} already committed" in text
    assert summary_numbers(text)["rows written"] == 1332 and f"({units} resumed)" in text
    table = pq.read_table(output)
    keys = set(zip(table["qid"].to_pylist(), table["pid"].to_pylist(), strict=True))
    assert table.num_rows == len(keys) == 1332  # every row once
    assert table["score_stage2"].null_count == 1332 - 37 * 5
    assert not [path for path in output.iterdir() if path.name.startswith(("_scored", "_select"))]
