"""Exactly-once output: atomic file commits and the output directory's layout (manifest: ``jobs.manifest``).

Layout of an output directory (names starting with ``_`` are hidden from Parquet readers):

- ``part-FFFFF-RRRRRRRRRRRR.parquet``: one file per work unit, each with its counts in its footer.
- ``_rescore_job.json``: what produced the output (model, scoring settings, input files); a rerun
  resumes only when it matches.
- ``_tmp/``: files being written on local disk, renamed into place when complete.
- ``_scored/``: per-unit files of a ranked job, before the per-query ranking.
- ``_ranking/``: a ranked job's final files while they are written, moved into place when all are.
- ``_selectN/``, ``_scoredN/``: a cascade's later stages (``jobs.cascade``).
- ``_WRITTEN``: the summary, written once every final file is in place and checked; a run that dies
  while clearing the working directories leaves it, and the rerun only finishes the cleanup.
- ``_SUCCESS``: the job's summary, written last (after the working directories are gone).
- ``_skipped_files.json``: the bad input files a ``--on-bad-file skip`` run left out, and why.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.retries import with_retries
from jobs.storage import Location, exists, parallel_map, storage_call
from reranker.errors import OutputError

logger = logging.getLogger(__name__)

SUCCESS_NAME = "_SUCCESS"
WRITTEN_NAME = "_WRITTEN"
SKIPPED_NAME = "_skipped_files.json"
TMP_DIR = "_tmp"
COUNTS_KEY = b"rerank.counts"


def commit_table(location: Location, name: str, table: pa.Table, counts: Mapping[str, Any]) -> None:
    """Write ``table`` as ``location/name`` so no reader ever sees it half-written.

    Local disk: written under ``_tmp/`` and renamed into place. Object stores: one upload, which
    becomes visible only when complete (a single PUT, or a multipart upload's completion).
    The unit's counts go into the file's footer metadata.
    """
    metadata = {**(table.schema.metadata or {}), COUNTS_KEY: json.dumps(dict(counts)).encode()}
    table = table.replace_schema_metadata(metadata)
    final = posixpath.join(location.path, name)

    def write() -> None:
        if not location.is_local:  # one upload of the finished bytes: an exception can't commit half
            buffer = pa.BufferOutputStream()
            pq.write_table(table, buffer)
            location.fs.pipe_file(final, buffer.getvalue().to_pybytes())
            return
        temporary = posixpath.join(location.path, TMP_DIR, f"{name}.{uuid.uuid4().hex}")
        location.fs.makedirs(posixpath.dirname(temporary), exist_ok=True)
        with location.fs.open(temporary, "wb") as handle:
            pq.write_table(table, handle)
        location.fs.mv(temporary, final)  # os.rename: atomic on one filesystem

    with_retries(write, f"writing {final}")


def committed_counts(location: Location, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The counts each committed unit file carries in its footer, by file name."""

    def counts_of(name: str) -> dict[str, Any]:
        path = posixpath.join(location.path, name)
        with location.fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).schema_arrow.metadata or {}
        if COUNTS_KEY not in metadata:
            raise OutputError(f"{path} was not written by this job (no {COUNTS_KEY.decode()} in its footer)")
        return dict(json.loads(metadata[COUNTS_KEY]))

    location.fs.invalidate_cache(location.path)  # the files were written by other processes
    counts = parallel_map(
        lambda name: storage_call(functools.partial(counts_of, name), f"reading {name}"),
        names,
        location.concurrency,
    )
    return dict(zip(names, counts, strict=True))


def list_names(location: Location, prefix: str = "part-") -> set[str]:
    """Names of the files directly under ``location`` that start with ``prefix``."""
    location.fs.invalidate_cache(location.path)
    if not exists(location):
        return set()
    entries = storage_call(lambda: location.fs.ls(location.path, detail=False), f"listing {location.path}")
    names = {posixpath.basename(entry.rstrip("/")) for entry in entries}
    return {name for name in names if name.startswith(prefix)}


def remove_files(location: Location, names: Sequence[str]) -> None:
    """Delete the named files (and directories) under ``location`` that exist (several at once on a store)."""
    parallel_map(lambda name: remove_path(location.child(name)), names, location.concurrency)


def remove_path(location: Location) -> None:
    """Delete a file or a directory tree if it exists (transient storage errors retried)."""
    if exists(location):
        storage_call(
            functools.partial(location.fs.rm, location.path, recursive=True), f"deleting {location.path}"
        )
