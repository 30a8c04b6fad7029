"""The job never loses, adds or misplaces rows: its input is never its output, a cascade's selection
follows the units it came from, every shape checks its row count before _SUCCESS, a crash while cleaning
up costs no rescore, and ranking works on logits. (Partition-like output paths and a cascade's monotone
scores: tests/integration/test_cascade_job.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs.cascade
import jobs.rescore
from jobs.commit import SUCCESS_NAME, WRITTEN_NAME
from jobs.rescore import main
from tests.helpers import build_tiny_cross_encoder, damage_data_page, pairs_table
from tests.integration.test_cascade_job import cascade

pytestmark = pytest.mark.integration


def visible(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if not path.name.startswith("_"))


def test_overwrite_of_the_input_itself_is_refused_and_loses_nothing(tmp_path, capsys, tiny_model_dir):
    """--input X --output X --overwrite (and an output that holds the input): one line, exit 2, the input
    intact: refused on the driver before anything is written or deleted."""
    source = tmp_path / "scored"
    source.mkdir()
    for part in range(2):
        pq.write_table(pairs_table(), source / f"part-{part}.parquet")
    before = {path.name: path.read_bytes() for path in source.iterdir()}
    for target in (source, tmp_path):
        args = ["--input", str(source), "--output", str(target), "--overwrite", "--on-bad-file", "skip"]
        assert main(["--model", str(tiny_model_dir), *args]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: output") and "overlaps input" in error and "\n" not in error
        assert {path.name: path.read_bytes() for path in source.iterdir()} == before


@pytest.mark.usefixtures("ray_session")
def test_a_selection_built_before_a_file_was_readable_is_redone(
    tmp_path,
    pairs,
    tiny_model_dir,
    larger_model_dir,
    monkeypatch,
):
    """Run 1 skips a file whose data page could not be read, selects, and dies in stage 2. In run 2 the
    same file (same size and mtime) reads fine: its rows are scored and must reach the output, so the
    selection is redone, and every row is written once."""
    source = tmp_path / "in"
    source.mkdir()
    for path in sorted(pairs.iterdir())[:2]:  # 888 rows: 37 queries of 24
        (source / path.name).write_bytes(path.read_bytes())
    flaky = source / "pairs-1.parquet"
    original, stat = flaky.read_bytes(), flaky.stat()
    damage_data_page(flaky)
    os.utime(flaky, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    output = tmp_path / "out"
    args = [
        "--input", str(source), "--output", str(output), "--group-column", "qid", "--rows-per-unit", "400",
        "--on-bad-file", "skip", "--cascade", cascade(tiny_model_dir, larger_model_dir, 3),
    ]  # fmt: skip

    def dies_in_stage_2(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("the driver died in stage 2")

    monkeypatch.setattr(jobs.cascade, "score_units", dies_in_stage_2)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert (output / "_select2" / "_DONE").exists()
    selection = [pq.ParquetFile(path).metadata for path in (output / "_select2").glob("*.parquet")]
    groups = [meta.row_group(i).num_rows for meta in selection for i in range(meta.num_row_groups)]
    assert groups and max(groups) <= 400  # row groups of at most rows_per_unit: units read only their rows
    monkeypatch.undo()
    flaky.write_bytes(original)
    os.utime(flaky, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(args) == 0
    table = pq.read_table(output)
    keys = set(zip(table["qid"].to_pylist(), table["pid"].to_pylist(), strict=True))
    assert table.num_rows == len(keys) == 2 * 444
    assert table["score_stage2"].null_count == 2 * 444 - 37 * 3  # every query's best 3, in every file
    assert not (output / "_skipped_files.json").exists()


@pytest.mark.usefixtures("ray_session")
def test_rows_missing_before_success_fail_loudly(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """A ranked job whose ranking saw one unit less than it scored: exit 1, one line, no _SUCCESS."""
    pq.write_table(pairs_table(copies=4), tmp_path / "in.parquet", row_group_size=24)
    real_rank = jobs.rescore.rank_scored

    def loses_a_unit(scored_at, names, *args, **kwargs):  # type: ignore[no-untyped-def]
        return real_rank(scored_at, names[:-1], *args, **kwargs)

    monkeypatch.setattr(jobs.rescore, "rank_scored", loses_a_unit)
    args = [
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--group-column",
        "qid",
    ]
    assert main(["--model", str(tiny_model_dir), *args, "--rank", "--rows-per-unit", "24"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hold 24 rows where 48 were expected" in errors[0]
    assert not (tmp_path / "out" / SUCCESS_NAME).exists() and not (tmp_path / "out" / WRITTEN_NAME).exists()


@pytest.mark.usefixtures("ray_session")
def test_a_crash_while_cleaning_up_costs_no_rescore(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """Killed after the ranked files are in place but before _SUCCESS: the rerun scores nothing, finishes
    the cleanup and reports the same rows."""
    pq.write_table(pairs_table(copies=4), tmp_path / "in.parquet", row_group_size=12)
    args = ["--model", str(tiny_model_dir), "--input", str(tmp_path / "in.parquet")]
    args += [
        "--output",
        str(tmp_path / "out"),
        "--group-column",
        "qid",
        "--top-k",
        "2",
        "--rows-per-unit",
        "12",
    ]
    real_write = jobs.rescore.write_json

    def dies_writing_success(location, name, value):  # type: ignore[no-untyped-def]
        if name == SUCCESS_NAME:
            raise KeyboardInterrupt("killed while writing _SUCCESS")
        real_write(location, name, value)

    monkeypatch.setattr(jobs.rescore, "write_json", dies_writing_success)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    ranked = {name: (tmp_path / "out" / name).read_bytes() for name in visible(tmp_path / "out")}
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rows written 6" in out and "units 4 (4 resumed)" in out and " 0.0 pairs/s" in out
    assert {name: (tmp_path / "out" / name).read_bytes() for name in visible(tmp_path / "out")} == ranked
    assert sorted(path.name for path in (tmp_path / "out").iterdir() if path.name.startswith("_")) == [
        "_SUCCESS", "_rescore_job.json"
    ]  # fmt: skip


@pytest.mark.usefixtures("ray_session")
def test_ranking_uses_logits_where_a_float32_sigmoid_would_tie(tmp_path, capsys):
    """Logits near -40 are all 0.0 in a float32 sigmoid: the job still ranks by the logits, and writes
    sigmoid values above 0."""
    from reranker.model import CrossEncoderModel

    model_dir = build_tiny_cross_encoder(tmp_path / "model", logit_offset=-40.0)
    table = pairs_table()
    pq.write_table(table, tmp_path / "in.parquet")
    args = [
        "--model",
        str(model_dir),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--group-column", "qid", "--rank", "--activation", "sigmoid"]) == 0
    output = pq.read_table(tmp_path / "out").sort_by([("qid", "ascending"), ("rank", "ascending")])
    logits = CrossEncoderModel(str(model_dir)).score(table["query"].to_pylist(), table["passage"].to_pylist())
    assert float(np.max(logits.scores)) < -30
    by_logit = {
        qid: [pid for _, pid in sorted(((-s, p) for q, p, s in zip(table["qid"].to_pylist(),
              table["pid"].to_pylist(), logits.scores, strict=True) if q == qid))]
        for qid in set(table["qid"].to_pylist())
    }  # fmt: skip
    for qid, pids in by_logit.items():
        assert [row["pid"] for row in output.to_pylist() if row["qid"] == qid] == pids
    scores = output["score"].to_numpy()
    assert np.all(scores > 0) and len(set(scores.tolist())) == len(scores)


def test_later_stage_units_are_cut_to_rows_per_unit(tmp_path):
    """A selection file of 1,000 rows in row groups of 100 becomes units of about rows_per_unit rows."""
    from jobs.storage import locate

    selected = tmp_path / "_select2"
    selected.mkdir()
    pq.write_table(pa.table({"x": list(range(1000))}), selected / "big.parquet", row_group_size=100)
    pq.write_table(pa.table({"x": list(range(30))}), selected / "small.parquet")
    (selected / "_DONE").write_text(json.dumps({}))
    units = jobs.cascade.selected_units(locate(str(selected), {}), 250)
    assert [unit.num_rows for unit in units] == [200, 200, 200, 200, 200, 30]
    assert len({unit.name for unit in units}) == len(units)
