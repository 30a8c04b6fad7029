import errno

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from jobs import retries, storage
from jobs.storage import (
    StorageUnavailableError,
    check_output_apart,
    find_input_files,
    inspect_input,
    prepare_output,
    read_footer,
    write_empty_output,
)
from reranker.errors import InputError, OutputError

pytestmark = pytest.mark.data

TEXT = ["query", "passage"]


def write(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def pairs_dir(tmp_path):
    for part in range(3):
        write(tmp_path / "in" / f"part-{part}.parquet", query=["q"] * 2, passage=["p"] * 2)
    (tmp_path / "in" / "_SUCCESS").write_text("")
    return tmp_path / "in"


def test_single_file_directory_and_glob_are_expanded(pairs_dir):
    """A file, a directory (data files only) and a glob each resolve to Parquet files."""
    assert len(find_input_files(str(pairs_dir / "part-0.parquet"), {})[1]) == 1
    assert len(find_input_files(str(pairs_dir), {})[1]) == 3
    assert len(find_input_files(str(pairs_dir / "part-[01].parquet"), {})[1]) == 2


def test_plan_counts_rows_from_footers(pairs_dir):
    """The plan totals rows across files without reading data pages."""
    plan = inspect_input(str(pairs_dir), {}, TEXT, ["score"])
    assert (len(plan.files), plan.num_rows) == (3, 6)


def test_plan_sizes_the_input_from_footers(tmp_path):
    """The plan's bytes are the row groups' uncompressed size: about the rows' Arrow size."""
    passages = ["x" * 1000 + str(i) for i in range(1000)]  # not repeated: no dictionary shrinks them
    write(tmp_path / "in" / "part-0.parquet", query=["q"] * 1000, passage=passages)
    plan = inspect_input(str(tmp_path / "in"), {}, TEXT, ["score"])
    assert 1_000_000 < plan.num_bytes < 1_100_000


def test_missing_path_is_named(tmp_path):
    """A path that does not exist fails naming it."""
    with pytest.raises(InputError, match=r"does not exist: .*nowhere"):
        find_input_files(str(tmp_path / "nowhere"), {})


def test_glob_matching_nothing_is_named(tmp_path):
    """A glob with no match fails naming the glob."""
    with pytest.raises(InputError, match=r"no file matches .*\*\.parquet"):
        find_input_files(str(tmp_path / "*.parquet"), {})


def test_directory_without_parquet_files_is_an_error(tmp_path):
    """A directory with no Parquet files fails naming it."""
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no Parquet files"):
        find_input_files(str(tmp_path), {})


def test_missing_column_names_column_and_file(tmp_path):
    """A missing column fails before scoring, naming the column and the file."""
    path = write(tmp_path / "a.parquet", query=["q"], text=["p"])
    with pytest.raises(InputError, match=r"'passage' not found in .*a\.parquet"):
        inspect_input(str(path), {}, TEXT, ["score"])


def test_missing_column_in_one_of_many_files_names_that_file(pairs_dir):
    """Every file's schema is checked, not just the first."""
    write(pairs_dir / "part-9.parquet", query=["q"], other=["p"])
    with pytest.raises(InputError, match=r"part-9\.parquet"):
        inspect_input(str(pairs_dir), {}, TEXT, ["score"])


def test_non_string_column_names_column_and_type(tmp_path):
    """A non-string text column fails with its name and type."""
    path = write(tmp_path / "a.parquet", query=["q"], passage=[42])
    with pytest.raises(InputError, match=r"'passage' .* has type int64; expected string"):
        inspect_input(str(path), {}, TEXT, ["score"])


def test_large_string_and_all_null_columns_are_accepted(tmp_path):
    """large_string and an all-null column are valid text columns."""
    table = pa.table({"query": pa.array(["q"], pa.large_string()), "passage": pa.array([None], pa.null())})
    pq.write_table(table, tmp_path / "a.parquet")
    assert inspect_input(str(tmp_path / "a.parquet"), {}, TEXT, ["score"]).num_rows == 1


def test_corrupt_parquet_names_the_file(tmp_path):
    """A file that is not valid Parquet fails naming it."""
    bad = tmp_path / "in" / "broken.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"cannot read Parquet file .*broken\.parquet"):
        inspect_input(str(bad.parent), {}, TEXT, ["score"])


def test_existing_score_column_is_not_overwritten(tmp_path):
    """An input that already has the score column fails instead of clobbering it."""
    path = write(tmp_path / "a.parquet", query=["q"], passage=["p"], score=[1.0])
    with pytest.raises(InputError, match="'score' already exists"):
        inspect_input(str(path), {}, TEXT, ["score"])


def test_output_with_data_needs_overwrite(tmp_path):
    """A non-empty output directory is refused unless --overwrite, which clears it."""
    write(tmp_path / "out" / "old.parquet", x=[1])
    with pytest.raises(OutputError, match="--overwrite"):
        prepare_output(str(tmp_path / "out"), {}, overwrite=False)
    prepare_output(str(tmp_path / "out"), {}, overwrite=True)
    assert not (tmp_path / "out").exists()


def test_empty_output_has_the_schema(tmp_path):
    """An empty output is one Parquet file with the full schema and no rows."""
    schema = pa.schema([("query", pa.string()), ("score", pa.float32())])
    location = prepare_output(str(tmp_path / "out"), {}, overwrite=False)
    write_empty_output(location, schema)
    footer = read_footer(location.fs, str(tmp_path / "out" / "part-00000.parquet"))
    assert footer.num_rows == 0 and footer.schema.equals(schema)


def test_globs_skip_hidden_files_as_directory_listings_do(pairs_dir):
    """`dir/*` leaves out _SUCCESS, .crc files and hidden directories, like a directory input."""
    (pairs_dir / ".part-0.parquet.crc").write_bytes(b"crc")
    write(pairs_dir / "_tmp" / "part-9.parquet", query=["q"], passage=["p"])
    write(pairs_dir / ".hidden" / "part-8.parquet", query=["q"], passage=["p"])
    _, files = find_input_files(str(pairs_dir / "*"), {})
    assert [path.rsplit("/", 1)[-1] for path in files] == [
        "part-0.parquet",
        "part-1.parquet",
        "part-2.parquet",
    ]
    _, nested = find_input_files(str(pairs_dir / "**" / "*.parquet"), {})
    assert len(nested) == 3
    plan = inspect_input(str(pairs_dir / "*"), {}, TEXT, ["score"])
    assert plan.num_rows == 6


@pytest.mark.parametrize(
    ("columns", "words"),
    [
        ({"query": ["q"], "passage": ["p"], "qid": [1], "lang": ["en"]}, "extra column 'lang'"),
        ({"query": ["q"], "passage": ["p"], "qid": ["1"]}, "column 'qid' is string, not int64"),
        ({"qid": [1], "passage": ["p"], "query": ["q"]}, "another order"),
    ],
    ids=["extra-column", "other-type", "other-order"],
)
def test_files_with_different_schemas_are_refused_naming_both(tmp_path, columns, words):
    """Input files must share one schema; a difference is one line naming it and both files."""
    first = write(tmp_path / "in" / "a.parquet", query=["q"], passage=["p"], qid=[1])
    other = write(tmp_path / "in" / "b.parquet", **columns)
    with pytest.raises(InputError) as error:
        inspect_input(str(tmp_path / "in"), {}, TEXT, ["score"])
    message = str(error.value)
    assert words in message and str(first) in message and str(other) in message
    assert len(message.splitlines()) == 1


def test_footer_reads_retry_transient_errors(tmp_path):
    """A dropped connection while reading a footer on the driver is retried; the plan is complete."""
    import errno

    from fsspec.implementations.local import LocalFileSystem

    from jobs import retries

    path = write(tmp_path / "a.parquet", query=["q"] * 3, passage=["p"] * 3)

    class DropsFirstRead(LocalFileSystem):
        opens = 0

        def _open(self, name, mode="rb", **kwargs):
            DropsFirstRead.opens += 1
            if DropsFirstRead.opens == 1:
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            return super()._open(name, mode, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retries.time, "sleep", lambda seconds: None)
        footer = read_footer(DropsFirstRead(), str(path))
    assert footer.num_rows == 3 and DropsFirstRead.opens == 2


def test_a_storage_outage_is_not_a_bad_file(tmp_path):
    """Storage that keeps failing transiently stops the job even with skip: it is not the file's fault."""
    from fsspec.implementations.local import LocalFileSystem

    from jobs import retries
    from jobs.storage import Location, StorageUnavailableError, read_footers

    path = write(tmp_path / "a.parquet", query=["q"], passage=["p"])

    class Down(LocalFileSystem):
        def _open(self, name, mode="rb", **kwargs):
            raise TimeoutError("read timed out")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retries.time, "sleep", lambda seconds: None)
        with pytest.raises(StorageUnavailableError, match="storage unavailable"):
            read_footers(Location(Down(), str(tmp_path)), [str(path)])


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("in", "in"),  # rescoring last week's output in place
        ("in", "in/"),
        ("in", "."),  # an output one level up holds the input
        ("in", "in/scored"),  # the input would list the job's own files next time
        ("in/part-0.parquet", "in"),
        ("in/part-[01].parquet", "in"),
        ("in/**", "in/scored"),  # the pattern reaches the job's own files
        ("in", "link-to-in"),  # the same directory through a symbolic link
    ],
)
def test_an_output_that_overlaps_the_input_is_refused(pairs_dir, source, target):
    """Equal to, containing or inside the input (after normalising paths and links): one line, nothing
    written, nothing deleted."""
    root = pairs_dir.parent
    (root / "link-to-in").symlink_to(pairs_dir)
    plan = inspect_input(str(root / source), {}, TEXT, ["score"])
    with pytest.raises(OutputError, match="input") as caught:
        check_output_apart(plan, str(root / source), str(root / target), {})
    assert len(str(caught.value).splitlines()) == 1
    assert sorted(path.name for path in pairs_dir.iterdir()) == [
        "_SUCCESS", "part-0.parquet", "part-1.parquet", "part-2.parquet"
    ]  # fmt: skip


@pytest.mark.parametrize(("source", "target"), [("in", "out"), ("in/part-*.parquet", "in/scored")])
def test_an_output_beside_the_input_is_accepted(pairs_dir, source, target):
    """A sibling directory, or a directory the input's pattern does not reach, is fine."""
    root = pairs_dir.parent
    plan = inspect_input(str(root / source), {}, TEXT, ["score"])
    check_output_apart(plan, str(root / source), str(root / target), {})


class FlakyListings(LocalFileSystem):
    """Local disk whose listing and details calls fail with a dropped connection ``failures`` times each
    (the calls the driver makes; fsspec's own calls inside them are left alone)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures: dict[str, int] = {}
        self.limit, self.depth = failures, 0

    def _call(self, name: str, method, *args, **kwargs):
        if self.depth == 0:
            self.failures[name] = self.failures.get(name, 0) + 1
            if self.failures[name] <= self.limit:
                raise ConnectionResetError(errno.ECONNRESET, f"{name}: connection reset by peer")
        self.depth += 1
        try:
            return method(*args, **kwargs)
        finally:
            self.depth -= 1

    def find(self, *args, **kwargs):
        return self._call("find", super().find, *args, **kwargs)

    def info(self, *args, **kwargs):
        return self._call("info", super().info, *args, **kwargs)

    def ls(self, *args, **kwargs):
        return self._call("ls", super().ls, *args, **kwargs)


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(retries.time, "sleep", lambda seconds: None)


def test_driver_listings_and_file_details_are_retried(pairs_dir, monkeypatch, no_backoff):
    """A throttled listing, HEAD or ls among many files is retried on the driver, not a traceback."""
    flaky = FlakyListings(failures=2)
    monkeypatch.setattr(storage.fsspec.core, "url_to_fs", lambda uri, **options: (flaky, uri))
    plan = inspect_input(str(pairs_dir), {}, TEXT, ["score"])
    assert len(plan.files) == 3 and len(plan.file_versions()) == 3
    prepare_output(str(pairs_dir.parent / "out"), {}, overwrite=False)
    assert flaky.failures["find"] == 3 and flaky.failures["info"] >= 3


def test_a_listing_that_keeps_failing_is_one_storage_line(pairs_dir, monkeypatch, no_backoff):
    """What survives the retries is the one-line storage error, naming the location."""
    flaky = FlakyListings(failures=100)
    monkeypatch.setattr(storage.fsspec.core, "url_to_fs", lambda uri, **options: (flaky, uri))
    with pytest.raises(StorageUnavailableError, match=r"listing .*in: storage unavailable after 5 tries"):
        inspect_input(str(pairs_dir), {}, TEXT, ["score"])
    assert flaky.failures["find"] == 5


class CountedInfo(LocalFileSystem):
    """Local disk that counts its ``info`` calls by path."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def info(self, path, **kwargs):
        self.asked.append(str(path))
        return super().info(path, **kwargs)


def test_file_versions_come_from_the_listing_as_info_gives_them(pairs_dir, monkeypatch):
    """The manifest's sizes and versions are the listing's (no request per file), equal to each ``info``;
    a symlinked file (its listing holds the link's mtime) and a single file are asked for theirs."""
    (pairs_dir / "link.parquet").symlink_to(pairs_dir / "part-0.parquet")
    counted = CountedInfo()
    monkeypatch.setattr(storage.fsspec.core, "url_to_fs", lambda uri, **options: (counted, uri))
    plan = inspect_input(str(pairs_dir), {}, TEXT, ["score"])
    counted.asked.clear()
    versions = plan.file_versions()
    assert counted.asked == [str(pairs_dir / "link.parquet")]
    asked = [storage._file_version(plan.location, path) for path in plan.files]
    assert versions == asked and [entry["path"] for entry in versions][:2] == [
        "link.parquet",
        "part-0.parquet",
    ]
    single = inspect_input(str(pairs_dir / "part-1.parquet"), {}, TEXT, ["score"])
    assert single.file_versions() == [asked[2]]


def test_files_of_one_schema_share_one_schema_object(pairs_dir):
    """100,000 footers of one schema hold it once; a file whose metadata differs keeps its own."""
    write(pairs_dir / "part-9.parquet", query=["q"], passage=["p"])
    table = pa.table({"query": ["q"], "passage": ["p"]}).replace_schema_metadata({"pandas": "{}"})
    pq.write_table(table, pairs_dir / "part-8.parquet")
    plan = inspect_input(str(pairs_dir), {}, TEXT, ["score"])
    schemas = {
        path.rsplit("/", 1)[-1]: footer.schema for path, footer in zip(plan.files, plan.footers, strict=True)
    }
    assert schemas["part-9.parquet"] is schemas["part-0.parquet"] is plan.schema
    assert schemas["part-8.parquet"] is not plan.schema
    assert schemas["part-8.parquet"].metadata == {b"pandas": b"{}"}


def test_parallel_map_keeps_the_order_and_stops_at_the_first_error():
    """Results in order; the first failing item's error is raised, and the items not yet started never run."""
    started: list[int] = []

    def action(item: int) -> int:
        started.append(item)
        if item == 3:
            raise InputError("bad item 3")
        return item * 2

    assert storage.parallel_map(action, list(range(3))) == [0, 2, 4]
    started.clear()
    with pytest.raises(InputError, match="bad item 3"):
        storage.parallel_map(action, list(range(10_000)))
    assert len(started) < 1_000
