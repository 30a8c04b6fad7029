"""Never lose or redo work: the job killed part-way and rerun, scoring actors killed, bad input files.

Jobs that get killed run as `python -m jobs.rescore` subprocesses in a POSIX session of their own
(with their own embedded Ray), so a test can SIGKILL exactly that job and everything it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.rescore import main
from tests.helpers import REPO_ROOT, damage_data_page
from tests.integration.processes import session_pids, stop_cluster, titled

pytestmark = pytest.mark.integration
FILES, ROWS_PER_FILE, ROWS_PER_UNIT = 6, 1500, 500
WORDS = [
    "solar",
    "panel",
    "energy",
    "wind",
    "farm",
    "tide",
    "river",
    "basil",
    "water",
    "season",
    "tilt",
    "axis",
    "orbit",
    "moon",
]


def write_input(directory: Path, files: int = FILES, rows: int = ROWS_PER_FILE) -> pa.Table:
    """``files`` Parquet files of (qid, pid, query, passage); no single id column, like MS MARCO."""
    directory.mkdir(parents=True, exist_ok=True)
    tables = []
    for index in range(files):
        pids = range(index * rows, (index + 1) * rows)
        table = pa.table(
            {
                "qid": [pid % 37 for pid in pids],
                "pid": [pid // 37 for pid in pids],
                "query": [" ".join(WORDS[(pid + k) % len(WORDS)] for k in range(3)) for pid in pids],
                "passage": [" ".join(WORDS[(pid * 7 + k) % len(WORDS)] for k in range(40)) for pid in pids],
            }
        )
        pq.write_table(table, directory / f"pairs-{index:02d}.parquet", row_group_size=250)
        tables.append(table)
    return pa.concat_tables(tables)


class JobProcess:
    """`python -m jobs.rescore ...` in a session of its own, with its own embedded Ray."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RERANK_"))}
        env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
        self.log = log
        with log.open("w") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jobs.rescore", *args],
                cwd=REPO_ROOT,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_until(self, condition: Callable[[], bool], timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.process.poll() is None, f"job ended early:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting"
            time.sleep(0.05)

    def kill_group(self) -> None:
        """SIGKILL the job's whole process group, then anything else of its session."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        assert stop_cluster(self.process.pid) == []

    def finish(self, timeout_s: float = 300) -> str:
        """Wait for the job; return its output, leaving no process of its session behind."""
        code = self.process.wait(timeout=timeout_s)
        stop_cluster(self.process.pid)
        text = self.log.read_text()
        assert code == 0, text[-3000:]
        return text


def job_args(model_dir: Path, source: str, target: str, *extra: str) -> list[str]:
    return [
        "--input",
        source,
        "--output",
        target,
        "--model",
        str(model_dir),
        "--rows-per-unit",
        str(ROWS_PER_UNIT),
        *extra,
    ]


def summary_numbers(text: str) -> dict[str, int]:
    """The figures of the job's summary line."""
    line = next(line for line in text.splitlines() if line.startswith("rescore: rows read"))
    names = ("rows read", "rows written", "pairs scored", "null scores", "units", "bad files skipped")
    return {name: int(re.search(rf"{name} (\d+)", line).group(1)) for name in names}  # type: ignore[union-attr]


def check_exactly_once(output: pa.Table, expected: pa.Table) -> None:
    """Every input row once, with the expected score (same unit, same batches: same float32)."""
    keys = ["qid", "pid"]
    output, expected = (
        output.sort_by([(k, "ascending") for k in keys]),
        expected.sort_by([(k, "ascending") for k in keys]),
    )
    assert output.num_rows == expected.num_rows
    assert output.select([*keys, "query"]).equals(expected.select([*keys, "query"]))
    assert output.column("score").to_pylist() == pytest.approx(expected.column("score").to_pylist(), abs=1e-6)


def uninterrupted(tmp_path: Path, model_dir: Path, source: Path) -> pa.Table:
    """The same job run once without faults (in this process's Ray)."""
    assert main(job_args(model_dir, str(source), str(tmp_path / "reference"))) == 0
    return pq.read_table(tmp_path / "reference")


@pytest.fixture(scope="module")
def default_input(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, ray_session: None):
    """The default input (``write_input``) and its uninterrupted output, made once for the module."""
    directory = tmp_path_factory.mktemp("default-input")
    table = write_input(directory / "in")
    return directory / "in", table, uninterrupted(directory, tiny_model_dir, directory / "in")


def committed_local(output: Path) -> dict[str, tuple[int, int]]:
    return {
        path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in output.glob("part-*.parquet")
    }


@pytest.mark.usefixtures("ray_session")
def test_sigkill_part_way_then_rerun_finishes_exactly_once(tmp_path, tiny_model_dir, default_input):
    """Kill the job's process group part-way; the same command finishes only what was left."""
    source, _, expected = default_input
    args = job_args(tiny_model_dir, str(source), str(tmp_path / "out"))
    first = JobProcess(args, tmp_path / "first.log")
    first.wait_until(lambda: len(committed_local(tmp_path / "out")) >= 3)
    first.kill_group()
    before = committed_local(tmp_path / "out")
    assert 3 <= len(before) < FILES * ROWS_PER_FILE // ROWS_PER_UNIT, "the kill came too late to test resume"
    text = JobProcess(args, tmp_path / "second.log").finish()
    numbers = summary_numbers(text)
    assert numbers["rows written"] == numbers["rows read"] == FILES * ROWS_PER_FILE
    assert f"({len(before)} resumed)" in text
    after = committed_local(tmp_path / "out")
    assert {name: after[name] for name in before} == before  # committed before the kill: not rewritten
    assert not (tmp_path / "out" / "_tmp").exists() or not any((tmp_path / "out" / "_tmp").iterdir())
    check_exactly_once(pq.read_table(tmp_path / "out"), expected)


@pytest.mark.usefixtures("ray_session")
def test_sigkill_part_way_then_rerun_on_s3(tmp_path, tiny_model_dir, s3_server, default_input):
    """The same on s3:// (moto): units committed before the kill keep their objects."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    source, table, expected = default_input
    fs.put(str(source) + "/", "rerank/resume-in/", recursive=True)
    options = ["--storage-options", json.dumps(s3_server)]
    args = job_args(tiny_model_dir, "s3://rerank/resume-in/", "s3://rerank/resume-out/", *options)

    def committed() -> dict[str, str]:
        fs.invalidate_cache()
        found = fs.glob("rerank/resume-out/part-*.parquet", detail=True)
        return {
            Path(path).name: str(info.get("LastModified")) + str(info.get("ETag"))
            for path, info in found.items()
        }

    first = JobProcess(args, tmp_path / "first.log")
    first.wait_until(lambda: len(committed()) >= 3)
    first.kill_group()
    before = committed()
    assert 3 <= len(before) < FILES * ROWS_PER_FILE // ROWS_PER_UNIT
    text = JobProcess(args, tmp_path / "second.log").finish()
    assert summary_numbers(text)["rows written"] == table.num_rows and f"({len(before)} resumed)" in text
    assert {name: committed()[name] for name in before} == before
    with fs.open("rerank/resume-out/_SUCCESS") as handle:
        assert json.load(handle)["rows_written"] == table.num_rows
    output = pa.concat_tables(
        pq.read_table(fs.open(path, "rb")) for path in sorted(fs.glob("rerank/resume-out/part-*"))
    )
    check_exactly_once(output, expected)


@pytest.mark.parametrize("moment", ["while scoring", "while loading the model"])
def test_a_killed_scoring_actor_is_replaced_and_no_row_is_lost_or_doubled(tmp_path, tiny_model_dir, moment):
    """SIGKILL a scoring actor mid-run or in its constructor: the job ends with every row once."""
    table = write_input(tmp_path / "in")
    job = JobProcess(
        job_args(tiny_model_dir, str(tmp_path / "in"), str(tmp_path / "out")), tmp_path / "job.log"
    )
    title = (
        "MapBatches(ScoreUnits)).submit" if moment == "while scoring" else "MapBatches(ScoreUnits)).__init__"
    )
    job.wait_until(lambda: bool(titled(job.process.pid, title)))
    if moment == "while loading the model":
        assert not committed_local(tmp_path / "out")
    os.kill(titled(job.process.pid, title)[0], signal.SIGKILL)
    text = job.finish()
    numbers = summary_numbers(text)
    output = pq.read_table(tmp_path / "out")
    assert numbers["rows written"] == numbers["rows read"] == numbers["pairs scored"] == output.num_rows
    assert output.num_rows == table.num_rows
    assert sorted(zip(output["qid"].to_pylist(), output["pid"].to_pylist(), strict=True)) == sorted(
        zip(table["qid"].to_pylist(), table["pid"].to_pylist(), strict=True)
    )
    assert output.column("score").null_count == 0
    assert session_pids(job.process.pid) == []


def corrupt(path: Path, damage: str) -> None:
    if damage == "footer":
        path.write_bytes(path.read_bytes()[:-12] + b"\x00" * 12)
    else:
        damage_data_page(path)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("damage", ["footer", "data page"])
def test_bad_file_fails_with_its_name_or_is_skipped_and_reported(tmp_path, capsys, tiny_model_dir, damage):
    """--on-bad-file fail: exit naming the file. skip: every good row written, a report, counted."""
    write_input(tmp_path / "in", files=3, rows=300)
    bad = tmp_path / "in" / "pairs-01.parquet"
    pq.write_table(pq.read_table(bad), bad, compression="snappy", row_group_size=100)
    corrupt(bad, damage)
    args = job_args(tiny_model_dir, str(tmp_path / "in"), str(tmp_path / "out"))
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot read Parquet file {bad}" in errors[0] and "Traceback" not in err
    assert main([*args, "--on-bad-file", "skip", "--overwrite"]) == 0
    out = capsys.readouterr().out
    output = pq.read_table(tmp_path / "out")
    good = pa.concat_tables(pq.read_table(tmp_path / "in" / f"pairs-0{i}.parquet") for i in (0, 2))
    assert sorted(output["pid"].to_pylist()) == sorted(good["pid"].to_pylist()) and output.num_rows == 600
    assert summary_numbers(out)["bad files skipped"] == 1 and summary_numbers(out)["rows written"] == 600
    report = json.loads((tmp_path / "out" / "_skipped_files.json").read_text())["skipped_files"]
    assert [entry["file"] for entry in report] == [str(bad)] and report[0]["reason"]


@pytest.mark.usefixtures("ray_session")
def test_sigkill_with_packed_small_files_then_rerun_finishes_exactly_once(tmp_path, tiny_model_dir):
    """60 files of 100 rows packed 4 to a unit: killed part-way, the rerun finishes only the missing
    units, and every row is written once with the scores of an unpacked run."""
    write_input(tmp_path / "in", files=60, rows=100)
    assert (
        main(
            job_args(
                tiny_model_dir, str(tmp_path / "in"), str(tmp_path / "reference"), "--rows-per-unit", "100"
            )
        )
        == 0
    )
    expected = pq.read_table(tmp_path / "reference")  # one unit per file: nothing packed
    args = job_args(tiny_model_dir, str(tmp_path / "in"), str(tmp_path / "out"), "--rows-per-unit", "400")
    first = JobProcess(args, tmp_path / "first.log")
    first.wait_until(lambda: len(committed_local(tmp_path / "out")) >= 3)
    first.kill_group()
    before = committed_local(tmp_path / "out")
    assert 3 <= len(before) < 15, "the kill came too late to test resume"
    text = JobProcess(args, tmp_path / "second.log").finish()
    assert summary_numbers(text)["units"] == 15 and f"({len(before)} resumed)" in text
    after = committed_local(tmp_path / "out")
    assert {name: after[name] for name in before} == before and len(after) == 15
    check_exactly_once(pq.read_table(tmp_path / "out"), expected)


@pytest.mark.usefixtures("ray_session")
def test_a_bad_file_among_packed_small_files_is_left_out_alone_and_stays_reported(
    tmp_path, capsys, tiny_model_dir
):
    """skip: a damaged file packed with 7 good ones costs only its own rows; a resumed run (the report and
    _SUCCESS gone) reports it again from the unit's footer. fail: one line naming it."""
    write_input(tmp_path / "in", files=8, rows=50)
    bad = tmp_path / "in" / "pairs-03.parquet"
    pq.write_table(pq.read_table(bad), bad, compression="snappy", row_group_size=25)
    corrupt(bad, "data page")
    args = job_args(tiny_model_dir, str(tmp_path / "in"), str(tmp_path / "out"))  # 8 x 50 rows: one unit
    assert main(args) == 2 and f"cannot read Parquet file {bad}" in capsys.readouterr().err
    assert main([*args, "--on-bad-file", "skip", "--overwrite"]) == 0
    numbers = summary_numbers(capsys.readouterr().out)
    assert (numbers["units"], numbers["rows written"], numbers["bad files skipped"]) == (1, 350, 1)
    report = tmp_path / "out" / "_skipped_files.json"
    assert [entry["file"] for entry in json.loads(report.read_text())["skipped_files"]] == [str(bad)]
    report.unlink()
    (tmp_path / "out" / "_SUCCESS").unlink()
    assert main([*args, "--on-bad-file", "skip"]) == 0
    numbers = summary_numbers(capsys.readouterr().out)
    assert (numbers["rows written"], numbers["bad files skipped"]) == (350, 1)
    assert [entry["file"] for entry in json.loads(report.read_text())["skipped_files"]] == [str(bad)]
