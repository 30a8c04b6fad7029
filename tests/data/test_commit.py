import errno
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from jobs import retries
from jobs.commit import commit_table, committed_counts
from jobs.manifest import changed_fields, read_json, write_json
from jobs.retries import is_transient, with_retries
from jobs.storage import Location
from reranker.errors import OutputError

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
def sleeps(monkeypatch):
    """No real backoff in tests; the waits asked for are recorded."""
    asked: list[float] = []
    monkeypatch.setattr(retries.time, "sleep", asked.append)
    return asked


def test_commit_retries_transient_storage_errors(tmp_path):
    """Throttling and dropped connections are retried; the file lands once, complete, with its counts."""
    fs = FlakyFileSystem(2, ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
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


def client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


def s3fs_error(code: str, status: int) -> OSError:
    """What s3fs raises for a botocore ClientError: its own OSError, caused by the ClientError."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(client_error(code, status))


def wrapped(error: BaseException, outer: Exception) -> Exception:
    try:
        raise outer from error
    except Exception as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TimeoutError("read timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (OSError(errno.ETIMEDOUT, "timed out"), True),
        (s3fs_error("SlowDown", 503), True),
        (s3fs_error("InternalError", 500), True),
        (client_error("RequestTimeout", 400), True),
        (wrapped(client_error("Throttling", 400), OSError("listing failed")), True),
        (s3fs_error("AccessDenied", 403), False),
        (s3fs_error("NoSuchKey", 404), False),
        (OSError("Couldn't deserialize thrift: corrupt page at offset 15030"), False),
        (OSError("cannot read s3://b/run-2503/part.parquet: 503 bytes short"), False),
        (OSError("request timed out (the words alone do not make it transient)"), False),
        (FileNotFoundError(errno.ENOENT, "no such key"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_is_transient_by_type_and_code_not_by_words(error, transient):
    """Throttling, timeouts, dropped connections and 5xx by type or provider code; never by message text."""
    assert is_transient(error) is transient


def test_backoff_is_jittered_and_capped(sleeps):
    """The waits between attempts are random (full jitter) and within the exponential cap."""
    for _ in range(20):
        calls: list[int] = []

        def fails_once(calls=calls) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise TimeoutError("read timed out")

        with_retries(fails_once, "flaky read")
    assert len(sleeps) == 20 and len(set(sleeps)) > 10
    assert all(0 <= wait <= retries.BACKOFF_MULTIPLIER_S for wait in sleeps)


def test_manifest_reads_are_retried(tmp_path):
    """A dropped connection while reading the manifest is retried, not a failed job."""
    write_json(Location(LocalFileSystem(), str(tmp_path)), "m.json", {"a": 1})

    class FlakyReads(LocalFileSystem):
        opens = 0

        def _open(self, path, mode="rb", **kwargs):
            FlakyReads.opens += 1
            if FlakyReads.opens == 1:
                raise ConnectionResetError(errno.ECONNRESET, "reset")
            return super()._open(path, mode, **kwargs)

    assert read_json(Location(FlakyReads(), str(tmp_path)), "m.json") == {"a": 1}
    assert FlakyReads.opens == 2


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


def test_working_directories_are_removed_before_success(tmp_path, monkeypatch):
    """A crash while writing _SUCCESS leaves no hidden copy of the data (_scored/, _tmp/) behind, only the
    _WRITTEN summary that tells the rerun to finish the cleanup."""
    from jobs import rescore

    for working in ("_scored", "_tmp", "_ranking"):
        (tmp_path / working).mkdir()
        (tmp_path / working / "part-00000-000000000000.parquet").write_bytes(b"scored rows")

    def crash(location, name, value):
        if name == rescore.SUCCESS_NAME:
            raise KeyboardInterrupt("killed while writing _SUCCESS")
        write_json(location, name, value)

    monkeypatch.setattr(rescore, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        rescore.finish(Location(LocalFileSystem(), str(tmp_path)), {}, (0, 0, 0), {}, 0.0)
    assert sorted(path.name for path in tmp_path.iterdir()) == [rescore.WRITTEN_NAME]


def test_listings_and_json_reads_are_retried_and_an_outage_is_one_line(tmp_path):
    """list_names and read_json retry a dropped connection; past the retries, one storage line."""
    from jobs.commit import list_names
    from jobs.storage import StorageUnavailableError
    from tests.data.test_storage import FlakyListings

    (tmp_path / "part-1.parquet").write_bytes(b"x")
    write_json(Location(LocalFileSystem(), str(tmp_path)), "m.json", {"a": 1})
    assert list_names(Location(FlakyListings(failures=2), str(tmp_path))) == {"part-1.parquet"}
    with pytest.raises(
        StorageUnavailableError, match=r"(checking|listing) .*: storage unavailable after 5 tries"
    ):
        list_names(Location(FlakyListings(failures=100), str(tmp_path)))


def test_an_output_started_by_an_earlier_version_is_not_resumed(tmp_path):
    """A manifest without format_version (its ranked units could hold sigmoid scores, which the ranking
    would squash again) is another job: refused with the field named, --overwrite to start fresh."""
    from jobs.manifest import FORMAT_VERSION, MANIFEST_NAME, resume_or_start
    from reranker.errors import OutputError

    location = Location(LocalFileSystem(), str(tmp_path))
    manifest = {"model": "m", "format_version": FORMAT_VERSION, "input_files": []}
    write_json(
        location, MANIFEST_NAME, {key: value for key, value in manifest.items() if key != "format_version"}
    )
    with pytest.raises(OutputError, match=r"format_version .*--overwrite"):
        resume_or_start(location, manifest, str(tmp_path))


def test_an_output_that_does_not_hold_the_rows_expected_is_never_marked_complete(tmp_path):
    """Every job shape passes its expected rows to finish(): a difference fails loudly, and neither
    _WRITTEN nor _SUCCESS is written."""
    from jobs import rescore

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "part-1.parquet")
    location = Location(LocalFileSystem(), str(tmp_path))
    with pytest.raises(rescore.RowsLostError, match="hold 2 rows where 3 were expected"):
        rescore.finish(location, {}, (1, 0, 0), {}, 0.0, rows_expected=3)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["part-1.parquet"]


def test_committed_counts_of_many_units_keep_their_names_and_a_foreign_file_is_named(tmp_path):
    """On an object store counts are read several at once, each under its own name; a file the job did not
    write is named."""
    location = Location(MemoryFileSystem(), f"/{tmp_path.name}")
    assert location.concurrency > 1
    names = [f"part-{index}.parquet" for index in range(40)]
    for index, name in enumerate(names):
        commit_table(location, name, pa.table({"x": list(range(index))}), {"rows": index})
    assert committed_counts(location, names) == {name: {"rows": index} for index, name in enumerate(names)}
    with location.fs.open(f"{location.path}/part-7.parquet", "wb") as handle:
        pq.write_table(pa.table({"x": [1]}), handle)
    with pytest.raises(OutputError, match=r"part-7.parquet was not written by this job"):
        committed_counts(location, names)
    location.fs.rm(location.path, recursive=True)
