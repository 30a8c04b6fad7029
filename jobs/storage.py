"""Input discovery and validation, and output handling, on any fsspec filesystem.

Everything here runs on the driver before any scoring, reading only Parquet footers, so bad
input fails fast with a message that names the file and column.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from reranker.errors import InputError, OutputError

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_GLOB_CHARS = ("*", "?", "[")
_TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.null())


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it (protocol stripped, absolute when local)."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        """True for the local disk."""
        return isinstance(self.fs, LocalFileSystem)

    def arrow_filesystem(self) -> pafs.FileSystem | None:
        """Filesystem for Ray Data: None (Arrow's native local) or fsspec wrapped for Arrow."""
        return None if self.is_local else pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


@dataclass(frozen=True)
class InputPlan:
    """The Parquet files to read and what their footers say."""

    location: Location
    files: list[str]
    schema: pa.Schema
    num_rows: int


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
    location = locate(uri, storage_options)
    fs, path = location.fs, location.path
    if any(char in path for char in _GLOB_CHARS):
        files = [match for match in fs.glob(path) if fs.isfile(match)]
        if not files:
            raise InputError(f"input path does not exist: no file matches {uri}")
    elif fs.isdir(path):
        files = [name for name in fs.find(path) if _is_data_file(name)]
        if not files:
            raise InputError(f"no Parquet files ({', '.join(PARQUET_SUFFIXES)}) found under {uri}")
    elif fs.isfile(path):
        files = [path]
    else:
        raise InputError(f"input path does not exist: {uri}")
    return location, sorted(files)


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return not name.startswith(("_", ".")) and name.endswith(PARQUET_SUFFIXES)


def read_footer(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pa.Schema, int]:
    """Schema and row count of one Parquet file, from its footer alone.

    Raises:
        InputError: The file is unreadable or not valid Parquet; the message names it.

    """
    try:
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            return metadata.schema.to_arrow_schema(), metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read Parquet file {path}: {exc}") from exc


def read_footers(location: Location, files: Sequence[str]) -> list[tuple[pa.Schema, int]]:
    """Schema and row count of each file, read in parallel (footers only)."""
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        return list(pool.map(lambda path: read_footer(location.fs, path), files))


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
) -> InputPlan:
    """Find the input files and validate every footer before anything is scored."""
    location, files = find_input_files(uri, storage_options)
    footers = read_footers(location, files)
    for path, (schema, _) in zip(files, footers, strict=True):
        check_text_columns(schema, text_columns, path)
        check_absent_columns(schema, new_columns, path)
    return InputPlan(location, files, footers[0][0], sum(rows for _, rows in footers))


def prepare_output(uri: str, storage_options: dict[str, Any], overwrite: bool) -> Location:
    """Check that the output directory is empty or absent (or clear it when ``overwrite``)."""
    location = locate(uri, storage_options)
    fs, path = location.fs, location.path
    if fs.exists(path):
        if fs.isfile(path):
            raise OutputError(f"output {uri} is a file; give a directory for the Parquet dataset")
        if fs.ls(path):
            if not overwrite:
                raise OutputError(f"output {uri} already holds data; pass --overwrite to replace it")
            fs.rm(path, recursive=True)
    return location


def write_empty_output(location: Location, schema: pa.Schema) -> None:
    """Write one empty Parquet file with the output schema (for an input with no rows)."""
    location.fs.makedirs(location.path, exist_ok=True)
    with location.fs.open(posixpath.join(location.path, "part-00000.parquet"), "wb") as handle:
        pq.write_table(schema.empty_table(), handle)


def count_rows(location: Location) -> int:
    """Rows in the Parquet files under an output directory, from their footers."""
    files = [name for name in location.fs.find(location.path) if _is_data_file(name)]
    return sum(read_footer(location.fs, path)[1] for path in files)
