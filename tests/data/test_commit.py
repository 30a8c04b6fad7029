import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from jobs import commit
from jobs.commit import changed_fields, commit_table, committed_counts, is_transient, with_retries
from jobs.storage import Location

pytestmark = pytest.mark.data


class FlakyFileSystem(LocalFileSystem):
    """Local disk whose first ``failures`` opens for writing raise ``error``."""

    def __init__(self, failures: int, error: Exception) -> None:
        super().__init__()
        self.failures, self.error, self.opens = failures, error, 0

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            self.opens += 1
            if self.opens <= self.failures:
                raise self.error
        return super()._open(path, mode, **kwargs)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(commit.time, "sleep", lambda seconds: None)


def test_commit_retries_transient_storage_errors(tmp_path):
    """Throttling and dropped connections are retried; the file lands once, complete, with its counts."""
    fs = FlakyFileSystem(2, OSError("SlowDown: Please reduce your request rate (503)"))
    location = Location(fs, str(tmp_path))
    commit_table(location, "part-1.parquet", pa.table({"x": [1, 2]}), {"rows": 2})
    assert fs.opens == 3 and pq.read_table(tmp_path / "part-1.parquet").num_rows == 2
    assert committed_counts(location, ["part-1.parquet"]) == {"part-1.parquet": {"rows": 2}}
    assert not list((tmp_path / "_tmp").iterdir())  # the temporary file was renamed, not copied


def test_commit_does_not_retry_other_errors(tmp_path):
    """A permission error is not transient: it fails at once, and nothing is visible."""
    fs = FlakyFileSystem(1, PermissionError("Access Denied"))
    with pytest.raises(PermissionError):
        commit_table(Location(fs, str(tmp_path)), "part-1.parquet", pa.table({"x": [1]}), {"rows": 1})
    assert fs.opens == 1 and not (tmp_path / "part-1.parquet").exists()


def test_retries_give_up_after_the_last_attempt():
    """A storage outage that outlasts the retries surfaces its error."""
    calls = []

    def always_down() -> None:
        calls.append(1)
        raise ConnectionError("connection reset by peer")

    with pytest.raises(ConnectionError):
        with_retries(always_down, "test", attempts=3)
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TimeoutError("read timed out"), True),
        (OSError("AWS Error SLOW_DOWN during GetObject"), True),
        (OSError("Couldn't deserialize thrift: don't know what type"), False),
        (FileNotFoundError("no such key"), False),
    ],
)
def test_is_transient(error, transient):
    """Only throttling, timeouts, dropped connections and 5xx count as transient."""
    assert is_transient(error) is transient


def test_changed_fields_name_settings_and_input_files():
    """A rerun's manifest differs: each change is named with both values, files by path."""
    before = {
        "model": "a",
        "max_length": 512,
        "input_files": [{"path": "x", "size": 1}, {"path": "y", "size": 2}],
    }
    after = {
        "model": "b",
        "max_length": 512,
        "input_files": [{"path": "x", "size": 5}, {"path": "z", "size": 2}],
    }
    assert changed_fields(before, after) == [
        "input file z added",
        "input file y removed",
        "input file x changed (size or version)",
        "model ('a' -> 'b')",
    ]
    assert changed_fields(before, json.loads(json.dumps(before))) == []
