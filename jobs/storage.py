"""Input discovery and validation, and output handling, on any fsspec filesystem.

Everything here runs on the driver before any scoring, reading only Parquet footers, so bad
input fails fast with a message that names the file and column.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from jobs.retries import STORAGE_ATTEMPTS, is_transient, with_retries
from reranker.errors import InputError, OutputError, RerankError

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_GLOB_CHARS = ("*", "?", "[")
_TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.null())
# Names the job writes: a unit's file (jobs.units) and a ranked block's (jobs.ranking).
_SAMPLE_OUTPUT_FILES = ("part-00000-000000000000.parquet", "part-0000000000000000.parquet")
# Storage calls the driver keeps in flight at once (footers, versions, counts, deletes, moves): on an
# object store each is a round trip of 10-50 ms, so 100,000 of them one after another take an hour.
STORAGE_CONCURRENCY = 16
S = TypeVar("S")
T = TypeVar("T")


class StorageUnavailableError(RerankError):
    """Storage kept failing with transient errors through every retry: an outage, not a bad file."""

    error_type = "storage_unavailable"


def exists(location: Location) -> bool:
    """Whether a file or directory exists, its transient errors retried.

    Not ``fs.exists``: fsspec's answers False on any error, so a throttled HEAD would read as "absent".

    Raises:
        StorageUnavailableError: Storage kept failing through every retry.
    """
    try:
        storage_call(lambda: location.fs.info(location.path), f"checking {location.path}")
    except FileNotFoundError:
        return False
    return True


def storage_call(action: Callable[[], T], what: str) -> T:
    """A driver-side storage call (listing, ``info``, ``exists``, ...), its transient errors retried.

    Raises:
        StorageUnavailableError: Still failing transiently after every retry; one line naming ``what``.
        Exception: The first error that is not transient, unchanged.
    """
    try:
        return with_retries(action, what)
    except Exception as exc:
        if not is_transient(exc):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StorageUnavailableError(
            f"{what}: storage unavailable after {STORAGE_ATTEMPTS} tries: {reason}"
        ) from exc


def parallel_map(action: Callable[[S], T], items: Sequence[S], workers: int = STORAGE_CONCURRENCY) -> list[T]:
    """``action`` on every item, results in order, at most ``workers`` at once (one: a plain loop).

    Only a bounded window of items is queued (memory stays flat at 100,000 items). The first error, in
    the items' order, is raised as a loop would raise it, and the items not yet started are cancelled.
    """
    if len(items) <= 1 or workers <= 1:
        return [action(item) for item in items]
    results: list[T] = []
    pending: deque[Future[T]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="storage") as pool:
        try:
            for item in items:
                pending.append(pool.submit(action, item))
                if len(pending) >= 4 * workers:
                    results.append(pending.popleft().result())
            while pending:
                results.append(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()
    return results


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it (protocol stripped, absolute when local)."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        """True for the local disk."""
        return isinstance(self.fs, LocalFileSystem)

    def child(self, name: str) -> Location:
        """The location of ``name`` under this one."""
        return Location(self.fs, posixpath.join(self.path, name))

    @property
    def concurrency(self) -> int:
        """Storage calls to keep in flight at once: ``STORAGE_CONCURRENCY`` (each call a round trip).

        1 on local disk: a call there costs microseconds, and threads would only add their overhead.
        """
        return 1 if self.is_local else STORAGE_CONCURRENCY

    def arrow_filesystem(self) -> pafs.FileSystem | None:
        """Filesystem for Ray Data: None (Arrow's native local) or fsspec wrapped for Arrow."""
        return None if self.is_local else pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


@dataclass(frozen=True)
class Footer:
    """What a Parquet file's footer says."""

    schema: pa.Schema
    num_rows: int
    row_groups: list[int]
    num_bytes: int = 0  # its row groups' uncompressed size (about the rows' size in memory)


@dataclass(frozen=True)
class InputPlan:
    """The Parquet files to read, what their footers say, and the files left out as bad."""

    location: Location
    files: list[str]
    footers: list[Footer]
    skipped: dict[str, str]
    listed: Mapping[str, tuple[Any, str]] = field(default_factory=dict)  # path: (size, version) listed

    @property
    def schema(self) -> pa.Schema:
        """The schema of every file (``inspect_input`` refuses files whose schemas differ)."""
        return self.footers[0].schema

    @property
    def num_rows(self) -> int:
        """Rows in all files."""
        return sum(footer.num_rows for footer in self.footers)

    @property
    def num_bytes(self) -> int:
        """Uncompressed bytes in all files, as their footers say."""
        return sum(footer.num_bytes for footer in self.footers)

    def file_versions(self) -> list[dict[str, Any]]:
        """Each file's path (relative to the input), size and version (ETag or mtime), for a manifest.

        From the listing where it gave both (no request per file), else from each file's ``info``.
        """
        return parallel_map(
            lambda path: _file_version(self.location, path, self.listed.get(path)),
            self.files,
            self.location.concurrency,
        )


def _file_version(location: Location, path: str, listed: tuple[Any, str] | None = None) -> dict[str, Any]:
    if listed is None:
        info = storage_call(lambda: location.fs.info(path), f"reading the details of {path}")
        listed = _size_and_version(info)
    relative = posixpath.relpath(path, location.path) if path != location.path else posixpath.basename(path)
    return {"path": relative, "size": listed[0], "version": listed[1]}


def _size_and_version(info: Mapping[str, Any]) -> tuple[Any, str]:
    """A file's size and version (ETag, else mtime) as ``info`` or a listing gives them."""
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return info.get("size"), str(version)


def _listed_versions(details: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[Any, str]]:
    """Size and version of each listed file whose listing entry gave both (the others are asked later).

    Only plain files: a local symlink's listing entry holds the link's mtime, its ``info`` the target's.
    """
    versions = {}
    for path, info in details.items():
        size, version = _size_and_version(info)
        if info.get("type") == "file" and not info.get("islink") and size is not None and version != "None":
            versions[path] = (size, version)
    return versions


def locate(uri: str, storage_options: dict[str, Any]) -> Location:
    """Resolve a URI (local path, ``s3://``, ``gs://``, ...) to a filesystem and path."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    except (ImportError, ValueError) as exc:
        raise InputError(f"unsupported location {uri}: {exc}") from exc
    return Location(fs, path)


def find_input_files(uri: str, storage_options: dict[str, Any]) -> tuple[Location, list[str]]:
    """Expand a file, directory or glob into a sorted list of Parquet files.

    Raises:
        InputError: Nothing exists there, or a directory holds no Parquet files.

    """
    location, listed = list_input(uri, storage_options)
    return location, sorted(listed)


def list_input(uri: str, storage_options: dict[str, Any]) -> tuple[Location, dict[str, Mapping[str, Any]]]:
    """The Parquet files of a file, directory or glob, each with what its listing said of it (``info``).

    A single file's entry is empty: nothing was listed.

    Raises:
        InputError: Nothing exists there, or a directory holds no Parquet files.

    """
    location = locate(uri, storage_options)
    fs, path = location.fs, location.path
    listing = f"listing {uri}"
    files: dict[str, Mapping[str, Any]]
    if is_glob(path):
        root = _glob_root(path)
        matches = storage_call(lambda: fs.glob(path, detail=True), listing)
        files = {
            name: info for name, info in matches.items() if _is_visible(name, root) and info["type"] == "file"
        }
        if not files:
            raise InputError(f"input path does not exist: no file matches {uri}")
    elif storage_call(lambda: fs.isdir(path), listing):
        found = storage_call(lambda: fs.find(path, detail=True), listing)
        files = {name: entry for name, entry in found.items() if _is_data_file(name, path)}
        if not files:
            raise InputError(f"no Parquet files ({', '.join(PARQUET_SUFFIXES)}) found under {uri}")
    elif storage_call(lambda: fs.isfile(path), listing):
        files = {path: {}}  # its details are asked for when needed
    else:
        raise InputError(f"input path does not exist: {uri}")
    return location, files


def is_glob(path: str) -> bool:
    """Whether a path holds glob wildcards (``*``, ``?``, ``[``)."""
    return any(char in path for char in _GLOB_CHARS)


def _is_data_file(path: str, root: str) -> bool:
    """A Parquet file, not hidden (no ``_`` or ``.`` name) and not in a hidden directory under root."""
    return _is_visible(path, root) and path.endswith(PARQUET_SUFFIXES)


def _is_visible(path: str, root: str) -> bool:
    """No ``_`` or ``.`` name (``_SUCCESS``, ``.crc``, ``_tmp/``) on the way from ``root`` to ``path``."""
    parts = posixpath.relpath(path, root).split("/")
    return not any(part.startswith(("_", ".")) for part in parts)


def _glob_root(pattern: str) -> str:
    """The directory part of a glob pattern before its first wildcard."""
    literal = []
    for part in pattern.split("/"):
        if any(char in part for char in _GLOB_CHARS):
            break
        literal.append(part)
    return "/".join(literal) or "/"


def read_footer(fs: fsspec.AbstractFileSystem, path: str) -> Footer:
    """Schema, row count, row-group sizes and uncompressed bytes of one Parquet file, from its footer alone.

    Transient storage errors are retried.

    Raises:
        InputError: The file is unreadable or not valid Parquet; the message names it.
        StorageUnavailableError: Storage still failed after every retry.

    """

    def read() -> Footer:
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            groups = [metadata.row_group(index) for index in range(metadata.num_row_groups)]
            return Footer(
                metadata.schema.to_arrow_schema(),
                metadata.num_rows,
                [group.num_rows for group in groups],
                sum(group.total_byte_size for group in groups),
            )

    try:
        return storage_call(read, f"reading the footer of {path}")
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read Parquet file {path}: {exc}") from exc


def read_footers(location: Location, files: Sequence[str]) -> list[Footer | InputError]:
    """Each file's footer, or the error that names why it can't be read (read in parallel)."""

    def footer_or_error(path: str) -> Footer | InputError:
        try:
            return read_footer(location.fs, path)
        except StorageUnavailableError:
            raise
        except InputError as exc:
            return exc

    return parallel_map(footer_or_error, files)


def check_present_columns(schema: pa.Schema, columns: Sequence[str], path: str) -> None:
    """Fail unless every column exists in ``schema``, naming the column, the file and its columns."""
    for column in columns:
        if column not in schema.names:
            raise InputError(f"column {column!r} not found in {path} (columns: {', '.join(schema.names)})")


def check_text_columns(schema: pa.Schema, columns: Sequence[str], path: str) -> None:
    """Fail unless every column exists in ``schema`` with a string type, naming column and file."""
    check_present_columns(schema, columns, path)
    for column in columns:
        column_type = schema.field(column).type
        if column_type not in _TEXT_TYPES:
            raise InputError(f"column {column!r} in {path} has type {column_type}; expected string")


def check_absent_columns(schema: pa.Schema, columns: Sequence[str], path: str) -> None:
    """Fail if the job would overwrite an existing column."""
    for column in columns:
        if column in schema.names:
            raise InputError(
                f"column {column!r} already exists in {path}; choose another with --score-column"
            )


def inspect_input(
    uri: str,
    storage_options: dict[str, Any],
    text_columns: Sequence[str],
    new_columns: Sequence[str],
    skip_bad_files: bool = False,
) -> InputPlan:
    """Find the input files and validate every footer before anything is scored.

    Raises:
        InputError: A missing column, or an unreadable file unless ``skip_bad_files``, in which
            case it is left out and listed in ``InputPlan.skipped``.

    """
    location, listed = list_input(uri, storage_options)
    files = sorted(listed)
    kept: list[str] = []
    footers: list[Footer] = []
    skipped: dict[str, str] = {}
    for path, footer in zip(files, read_footers(location, files), strict=True):
        if isinstance(footer, InputError):
            if not skip_bad_files:
                raise footer
            skipped[path] = str(footer)
            continue
        check_text_columns(footer.schema, text_columns, path)
        check_absent_columns(footer.schema, new_columns, path)
        if footers:
            check_same_schema(footers[0].schema, kept[0], footer.schema, path)
        kept.append(path)
        footers.append(_sharing_schema(footer, footers[0] if footers else None))
    if not kept:
        raise InputError(f"no readable Parquet file in {uri} ({len(skipped)} bad)")
    return InputPlan(
        location, kept, footers, skipped, _listed_versions({path: listed[path] for path in kept})
    )


def _sharing_schema(footer: Footer, first: Footer | None) -> Footer:
    """``footer``, holding the first file's schema object when the two are equal, metadata included.

    100,000 files of one schema would otherwise hold 100,000 copies of it (with pandas' or Spark's
    metadata, a few KiB each).
    """
    if (
        first is None
        or footer.schema is first.schema
        or not footer.schema.equals(first.schema, check_metadata=True)
    ):
        return footer
    return replace(footer, schema=first.schema)


def check_same_schema(first: pa.Schema, first_path: str, other: pa.Schema, other_path: str) -> None:
    """Fail unless two input files have the same columns, types and order, naming both files."""
    if other.remove_metadata().equals(first.remove_metadata()):
        return
    difference = _first_difference(first, other)
    raise InputError(
        f"input files have different schemas: {difference} in {other_path} vs {first_path}; "
        "rescore them as separate jobs or rewrite them to one schema"
    )


def _first_difference(first: pa.Schema, other: pa.Schema) -> str:
    for name in first.names:
        if name not in other.names:
            return f"column {name!r} missing"
    for name in other.names:
        if name not in first.names:
            return f"extra column {name!r}"
    for name in first.names:
        if first.field(name).type != other.field(name).type:
            return f"column {name!r} is {other.field(name).type}, not {first.field(name).type}"
    return f"columns in another order ({', '.join(other.names)})"


def check_output_apart(
    plan: InputPlan, input_uri: str, output_uri: str, storage_options: dict[str, Any]
) -> None:
    """Refuse an output that equals, contains or lies inside the input, before anything is written.

    The job writes its files into the output and, with ``--overwrite``, deletes it first: either
    would destroy or change the input (rescoring last week's output in place, an output one level up).

    Raises:
        OutputError: One line naming both locations.
    """
    output = locate(output_uri, storage_options)
    if not _same_filesystem(plan.location.fs, output.fs):
        return
    out = _normalised(output)
    source = _normalised(plan.location)
    paths = [_normalised(plan.location, path) for path in [*plan.files, *plan.skipped]]
    if not is_glob(source):
        paths.append(source)
    if any(out == path or _inside(path, out) or _inside(out, path) for path in paths):
        raise OutputError(
            f"output {output_uri} overlaps input {input_uri} (it equals, contains or lies inside it) and "
            "the job writes there, or with --overwrite deletes it first; choose an output outside the input"
        )
    reached = (re.match(glob_translate(source), posixpath.join(out, name)) for name in _SAMPLE_OUTPUT_FILES)
    if is_glob(source) and any(reached):
        raise OutputError(
            f"output {output_uri} lies where input {input_uri} matches: a rerun would read the job's own "
            "files as input; choose an output the pattern does not reach"
        )


def _same_filesystem(first: fsspec.AbstractFileSystem, second: fsspec.AbstractFileSystem) -> bool:
    protocols = [{first.protocol} if isinstance(first.protocol, str) else set(first.protocol)]
    protocols.append({second.protocol} if isinstance(second.protocol, str) else set(second.protocol))
    return bool(protocols[0] & protocols[1])


def _normalised(location: Location, path: str | None = None) -> str:
    """A path as comparable text: symlinks resolved on local disk, no trailing slash, no ``..``."""
    path = posixpath.normpath(location.path if path is None else path)
    if not location.is_local:
        return path
    if not is_glob(path):
        return os.path.realpath(path)
    root = _glob_root(path)
    return os.path.realpath(root) + path[len(root) :]


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` lies strictly below ``directory``."""
    return path.startswith(directory.rstrip("/") + "/")


def prepare_output(
    uri: str, storage_options: dict[str, Any], overwrite: bool, resumable: Sequence[str] = ()
) -> Location:
    """Check that the output directory is empty or absent (or clear it when ``overwrite``).

    Args:
        uri: The output directory.
        storage_options: fsspec options.
        overwrite: Delete whatever is there.
        resumable: Marker file names; a directory holding one of them is left for the caller to
            resume instead of being refused.

    Raises:
        OutputError: The output is a file, or holds data that isn't resumable and no ``overwrite``.

    """
    location = locate(uri, storage_options)
    fs, path = location.fs, location.path
    fs.invalidate_cache(path)
    if exists(location):
        if storage_call(lambda: fs.isfile(path), f"checking {uri}"):
            raise OutputError(f"output {uri} is a file; give a directory for the Parquet dataset")
        entries = storage_call(lambda: fs.ls(path, detail=False), f"listing {uri}")
        if entries and overwrite:
            storage_call(lambda: fs.rm(path, recursive=True), f"deleting {uri}")
        elif entries and not {posixpath.basename(entry.rstrip("/")) for entry in entries} & set(resumable):
            raise OutputError(f"output {uri} already holds data; pass --overwrite to replace it")
    return location


def write_empty_output(location: Location, schema: pa.Schema) -> None:
    """Write one empty Parquet file with the output schema (for an input with no rows)."""

    def write() -> None:
        location.fs.makedirs(location.path, exist_ok=True)
        with location.fs.open(posixpath.join(location.path, "part-00000.parquet"), "wb") as handle:
            pq.write_table(schema.empty_table(), handle)

    storage_call(write, f"writing {location.path}")


def count_rows(location: Location) -> int:
    """Rows in the Parquet files under an output directory, from their footers."""
    location.fs.invalidate_cache(location.path)
    found = storage_call(lambda: location.fs.find(location.path), f"listing {location.path}")
    files = [name for name in found if _is_data_file(name, location.path)]
    return sum(
        parallel_map(lambda path: read_footer(location.fs, path).num_rows, files, location.concurrency)
    )
