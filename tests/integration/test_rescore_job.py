import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from jobs.rescore import main
from tests.helpers import damage_data_page, pairs_table

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def run_job(capsys, model_dir, *args: str) -> tuple[int, str, str]:
    code = main(["--model", str(model_dir), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_output(path) -> pa.Table:
    table = pads.dataset(str(path), format="parquet").to_table()
    keys = [name for name in ("qid", "pid") if name in table.column_names]
    return table.sort_by([(name, "ascending") for name in keys])


def test_single_file_keeps_every_column_and_row(tmp_path, capsys, tiny_model_dir, tiny_model):
    """Every input column and row comes back with a float32 score equal to in-process scoring."""
    pq.write_table(pairs_table(), tmp_path / "in.parquet")
    code, out, _ = run_job(
        capsys, tiny_model_dir, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")
    )
    assert code == 0
    table = read_output(tmp_path / "out")
    assert table.column_names == ["qid", "pid", "query", "passage", "lang", "score"]
    assert table.schema.field("score").type == pa.float32()
    expected = tiny_model.score(table.column("query").to_pylist(), table.column("passage").to_pylist()).scores
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, atol=1e-6)
    assert "rows read 12, rows written 12" in out and "pairs/s" in out and "wall" in out


def test_multi_file_directory_and_glob(tmp_path, capsys, tiny_model_dir):
    """A directory of several files and a glob over it are both read completely."""
    (tmp_path / "in").mkdir()
    for part in range(3):
        pq.write_table(pairs_table(), tmp_path / "in" / f"part-{part}.parquet")
    code, _, _ = run_job(
        capsys, tiny_model_dir, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o1")
    )
    assert code == 0 and read_output(tmp_path / "o1").num_rows == 36
    code, _out, _ = run_job(
        capsys,
        tiny_model_dir,
        "--input",
        str(tmp_path / "in" / "part-[02].parquet"),
        "--output",
        str(tmp_path / "o2"),
    )
    assert code == 0 and read_output(tmp_path / "o2").num_rows == 24


def test_null_and_empty_text_gives_counted_null_scores(tmp_path, capsys, tiny_model_dir):
    """Null or empty query/passage rows are kept with a null score and counted."""
    table = pa.table(
        {"qid": [1, 2, 3, 4], "query": ["solar", None, "", "sun"], "passage": ["panel", "p", "x", None]}
    )
    pq.write_table(table, tmp_path / "in.parquet")
    code, out, _ = run_job(
        capsys, tiny_model_dir, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")
    )
    assert code == 0
    scores = read_output(tmp_path / "out").column("score")
    assert scores.is_null().to_pylist() == [False, True, True, True]
    assert "rows written 4" in out and "null scores 3" in out


def test_empty_input_writes_empty_output_with_schema(tmp_path, capsys, tiny_model_dir):
    """An input with zero rows gives an empty output with the input columns plus score."""
    schema = pa.schema([("qid", pa.int64()), ("query", pa.string()), ("passage", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "in.parquet")
    code, out, _ = run_job(
        capsys, tiny_model_dir, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")
    )
    assert code == 0 and "rows read 0, rows written 0" in out
    result = pads.dataset(str(tmp_path / "out"), format="parquet")
    assert result.count_rows() == 0
    assert result.schema.names == ["qid", "query", "passage", "score"]
    assert result.schema.field("score").type == pa.float32()


def test_rank_and_top_k_within_query(tmp_path, capsys, tiny_model_dir, tiny_model):
    """--group-column with --rank --top-k keeps exactly the k best rows per query, ranked 1..k by score;
    equal scores (each pair appears twice) keep their input order."""
    table = pairs_table(copies=2)
    table = table.set_column(1, "pid", pa.array(range(table.num_rows)))  # pids in input order
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=6)  # 4 units: the shuffle may mix them
    code, _, _ = run_job(
        capsys,
        tiny_model_dir,
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--group-column",
        "qid",
        "--rank",
        "--top-k",
        "3",
        "--rows-per-unit",
        "6",
    )
    assert code == 0
    output = read_output(tmp_path / "out").to_pylist()
    assert len(output) == 9
    scores = tiny_model.score(table.column("query").to_pylist(), table.column("passage").to_pylist()).scores
    for qid in range(3):
        rows = [i for i, q in enumerate(table.column("qid").to_pylist()) if q == qid]
        best = sorted(rows, key=lambda i: (-scores[i], i))[:3]  # score, then input position
        kept = sorted((r for r in output if r["qid"] == qid), key=lambda r: r["rank"])
        assert [r["pid"] for r in kept] == best and [r["rank"] for r in kept] == [1, 2, 3]
        np.testing.assert_allclose([r["score"] for r in kept], scores[best], atol=1e-6)
    assert "__rerank_position__" not in pq.read_schema(next((tmp_path / "out").glob("*.parquet"))).names


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: d / "missing.parquet", "input path does not exist"),
        (
            lambda d: (
                pq.write_table(pa.table({"query": ["q"], "text": ["p"]}), d / "a.parquet"),
                d / "a.parquet",
            )[1],
            "'passage' not found",
        ),
        (
            lambda d: (
                pq.write_table(pa.table({"query": ["q"], "passage": [1]}), d / "a.parquet"),
                d / "a.parquet",
            )[1],
            "type int64",
        ),
        (
            lambda d: ((d / "bad.parquet").write_bytes(b"garbage"), d / "bad.parquet")[1],
            "cannot read Parquet file",
        ),
    ],
    ids=["missing-path", "missing-column", "non-string", "corrupt"],
)
def test_bad_input_exits_nonzero_with_one_line(tmp_path, capsys, tiny_model_dir, make_input, message):
    """User errors exit 2 with one line on stderr naming the problem, and write nothing."""
    path = make_input(tmp_path)
    code, _out, err = run_job(capsys, tiny_model_dir, "--input", str(path), "--output", str(tmp_path / "out"))
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_job_that_can_make_no_progress_ends_with_one_line(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """GPU actors asked of a cluster with no GPU can never start: once Ray Data's no-progress limit
    passes, the job exits 1 with one line saying what waited and that a rerun resumes (no traceback)."""
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "execution_no_progress_timeout_s", 5.0)
    pq.write_table(pairs_table(), tmp_path / "in.parquet")
    code, _out, err = run_job(
        capsys, tiny_model_dir, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
        "--gpus-per-actor", "1", "--num-actors", "1",
    )  # fmt: skip
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: Dataset execution made no progress for at least 5s"), err[-2000:]
    assert "waiting on MapBatches(ScoreUnits)" in line and "rerun the same command to resume" in line
    assert "Traceback" not in err


def test_rerun_of_a_finished_job_does_nothing_and_a_changed_one_is_refused(tmp_path, capsys, tiny_model_dir):
    """Same command again: nothing rescored. Changed settings or foreign data: refused unless --overwrite.
    --dry-run says each of these before it happens, and writes nothing."""
    pq.write_table(pairs_table(), tmp_path / "in.parquet")
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]
    code, out, _ = run_job(capsys, tiny_model_dir, *args, "--dry-run")
    assert code == 0 and not (tmp_path / "out").exists()
    assert "1 files, 12 rows" in out and "out: new" in out and "1 committed" not in out
    assert "0 committed (resumed), 1 to score" in out and "stage 1: " in out and "ActorPoolPlan(" in out
    assert run_job(capsys, tiny_model_dir, *args)[0] == 0
    code, out, _ = run_job(capsys, tiny_model_dir, *args, "--dry-run")
    assert "complete: a run does nothing" in out and "1 committed (resumed), 0 to score" in out
    code, out, _ = run_job(capsys, tiny_model_dir, *args, "--dry-run", "--max-length", "32")
    assert code == 0 and "made by other settings (max_length (512 -> 32))" in out
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*")}
    code, out, _ = run_job(capsys, tiny_model_dir, *args)
    assert code == 0 and "rows written 12" in out and "units 1 (1 resumed)" in out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*")} == first
    code, _, err = run_job(capsys, tiny_model_dir, *args, "--activation", "sigmoid", "--max-length", "32")
    assert code == 2 and "activation ('none' -> 'sigmoid')" in err and "max_length (512 -> 32)" in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert run_job(capsys, tiny_model_dir, *args, "--activation", "sigmoid", "--overwrite")[0] == 0
    pq.write_table(pairs_table(), tmp_path / "foreign" / "x.parquet") if (
        tmp_path / "foreign"
    ).mkdir() is None else None
    foreign = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "foreign")]
    code, out, _ = run_job(capsys, tiny_model_dir, *foreign, "--dry-run")
    assert code == 0 and "holds other data: a run refuses it without --overwrite" in out
    code, _, err = run_job(capsys, tiny_model_dir, *foreign)
    assert code == 2 and "already holds data" in err


def test_s3_input_and_output(tmp_path, capsys, tiny_model_dir, s3_server):
    """s3:// in and out through fsspec against a local S3-compatible server."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    for part in range(2):
        with fs.open(f"rerank/in/part-{part}.parquet", "wb") as handle:
            pq.write_table(pairs_table(), handle)
    code, out, err = run_job(
        capsys,
        tiny_model_dir,
        "--input",
        "s3://rerank/in/",
        "--output",
        "s3://rerank/out/",
        "--storage-options",
        json.dumps(s3_server),
    )
    assert code == 0, err
    written = [p for p in fs.find("rerank/out") if p.endswith(".parquet")]
    rows = sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in written)
    assert rows == 24 and "rows written 24" in out


@pytest.mark.parametrize("problem", ["missing", "no-weights", "three-labels", "bare-encoder"])
def test_unloadable_model_fails_on_the_driver(tmp_path, capsys, tiny_model_dir, problem):
    """A model that can't be loaded: exit 2, one line naming it, no worker traceback, nothing written."""
    import shutil

    from tests.helpers import build_headless_checkpoint, build_tiny_cross_encoder

    model = tmp_path / "model"
    if problem == "no-weights":
        shutil.copytree(tiny_model_dir, model)
        for weights in model.glob("*.safetensors"):
            weights.unlink()
    elif problem == "three-labels":
        build_tiny_cross_encoder(model, num_labels=3)
        capsys.readouterr()  # the builder's own progress output
    elif problem == "bare-encoder":
        build_headless_checkpoint(model, "bare-encoder")
        capsys.readouterr()
    pq.write_table(pairs_table(), tmp_path / "in.parquet")
    code, _, err = run_job(
        capsys, model, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")
    )
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert str(model) in err and "Traceback" not in err and not (tmp_path / "out").exists()
    expected = {
        "missing": "--model DIR",
        "no-weights": "no weights",
        "three-labels": "3 labels",
        "bare-encoder": "classifier.weight",
    }[problem]
    assert expected in err


def test_a_resume_with_other_model_weights_is_refused(tmp_path, capsys, tiny_model_dir):
    """The manifest records the model version loaded; new weights in the same directory are a new job."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    pq.write_table(pairs_table(), tmp_path / "in.parquet")
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]
    assert run_job(capsys, model, *args)[0] == 0
    manifest = json.loads((tmp_path / "out" / "_rescore_job.json").read_text())
    assert manifest["model_version"].startswith("dir:")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # as a retrained checkpoint saved in place would be
    code, _, err = run_job(capsys, model, *args)
    assert (
        code == 2 and "model_version" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    )


@pytest.mark.parametrize("group", [False, True], ids=["plain", "ranked"])
def test_every_unit_bad_mid_run_ends_like_an_empty_input(tmp_path, capsys, tiny_model_dir, group):
    """--on-bad-file skip with every file damaged behind a valid footer: one empty file with the full
    schema, the report, exit 0."""
    (tmp_path / "in").mkdir()
    for part in range(2):
        path = tmp_path / "in" / f"part-{part}.parquet"
        pq.write_table(pairs_table(copies=20), path, compression="snappy")
        damage_data_page(path)
    extra = ["--group-column", "qid", "--rank"] if group else []
    code, out, err = run_job(
        capsys,
        tiny_model_dir,
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--on-bad-file",
        "skip",
        *extra,
    )
    assert code == 0, err
    assert "rows written 0" in out and "bad files skipped 2" in out
    result = pads.dataset(str(tmp_path / "out"), format="parquet")
    expected = ["qid", "pid", "query", "passage", "lang", "score", *(["rank"] if group else [])]
    assert result.count_rows() == 0 and result.schema.names == expected
    report = json.loads((tmp_path / "out" / "_skipped_files.json").read_text())["skipped_files"]
    assert len(report) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("_")) == [
        "_SUCCESS",
        "_rescore_job.json",
        "_skipped_files.json",
    ]
