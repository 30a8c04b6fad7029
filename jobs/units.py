"""Work units: the job's unit of scoring, commit and resume.

A unit is a contiguous row range of one input file (whole row groups where they are small enough),
or several whole small files packed together until the unit holds about ``rows_per_unit`` rows (so
10,000 files of 1,000 rows make about 200 units, not 10,000). Its output file name is derived from its
first file's position in the sorted input and its first row, so a rerun of the same job maps every
unit to the same output file.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

READ_BATCH_ROWS = 16_384


@dataclass(frozen=True)
class WorkUnit:
    """Rows ``[row_start, row_stop)`` of input file ``path``, then the whole files ``more_files``."""

    file_index: int
    path: str
    row_start: int
    row_stop: int
    more_files: tuple[WorkUnit, ...] = ()  # small files packed after the first, each read whole

    @property
    def name(self) -> str:
        """The output file name of this unit, the same in every run of the job."""
        return f"part-{self.file_index:05d}-{self.row_start:012d}.parquet"

    @property
    def parts(self) -> tuple[WorkUnit, ...]:
        """The unit's row ranges, one per file, in input order."""
        first = WorkUnit(self.file_index, self.path, self.row_start, self.row_stop)
        return (first, *self.more_files)

    @property
    def num_rows(self) -> int:
        """Rows in the unit."""
        return sum(part.row_stop - part.row_start for part in self.parts)


def plan_units(
    files: Sequence[str], row_groups: Sequence[Sequence[int]], rows_per_unit: int
) -> list[WorkUnit]:
    """Cut every file into units of about ``rows_per_unit`` rows.

    Small row groups are packed whole into a unit until it would pass ``rows_per_unit``; a row
    group larger than that is split into equal row ranges. Consecutive files smaller than half a
    unit are packed whole into one unit while it stays within ``rows_per_unit`` rows.

    Args:
        files: Input files, in their stable (sorted) order.
        row_groups: Row count of each row group of each file.
        rows_per_unit: Target rows per unit.

    """
    units: list[WorkUnit] = []
    packing: list[WorkUnit] = []
    packed_rows = 0  # rows in ``packing``, kept as it grows: summing it per file is quadratic in it
    for file_index, (path, groups) in enumerate(zip(files, row_groups, strict=True)):
        rows = sum(groups)
        if 0 < rows <= rows_per_unit // 2:
            if packed_rows + rows > rows_per_unit:
                units.append(_packed(packing))
                packing, packed_rows = [], 0
            packing.append(WorkUnit(file_index, path, 0, rows))
            packed_rows += rows
            continue
        if packing:
            units.append(_packed(packing))
            packing, packed_rows = [], 0
        units.extend(
            WorkUnit(file_index, path, start, stop) for start, stop in _unit_ranges(groups, rows_per_unit)
        )
    if packing:
        units.append(_packed(packing))
    return units


def _packed(files: list[WorkUnit]) -> WorkUnit:
    first = files[0]
    return WorkUnit(first.file_index, first.path, first.row_start, first.row_stop, tuple(files[1:]))


def _unit_ranges(groups: Sequence[int], rows_per_unit: int) -> Iterator[tuple[int, int]]:
    unit_start = group_start = 0
    for size in groups:
        group_stop = group_start + size
        if size > rows_per_unit:
            if group_start > unit_start:
                yield unit_start, group_start
            pieces = math.ceil(size / rows_per_unit)
            bounds = [group_start + size * piece // pieces for piece in range(pieces + 1)]
            yield from itertools.pairwise(bounds)
            unit_start = group_stop
        elif group_stop - unit_start > rows_per_unit and group_start > unit_start:
            yield unit_start, group_start
            unit_start = group_start
        group_start = group_stop
    if group_start > unit_start:
        yield unit_start, group_start


def read_unit(fs: fsspec.AbstractFileSystem, unit: WorkUnit) -> pa.Table:
    """The unit's rows (every part, in order), reading only the row groups they overlap.

    Raises:
        OSError, pyarrow.ArrowException: A file can't be read or is damaged.

    """
    return pa.concat_tables([read_range(fs, part) for part in unit.parts])


def read_range(fs: fsspec.AbstractFileSystem, unit: WorkUnit) -> pa.Table:
    """The rows of one file range (``unit``'s first part), a batch at a time.

    Raises:
        OSError, pyarrow.ArrowException: The file can't be read or is damaged.

    """
    with fs.open(unit.path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        group_start, groups = _overlapping_groups(parquet.metadata, unit)
        pieces, position = [], group_start
        batches = parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, use_threads=False)
        for batch in batches:
            low, high = max(unit.row_start - position, 0), min(unit.row_stop - position, batch.num_rows)
            if high > low:
                pieces.append(batch.slice(low, high - low))
            position += batch.num_rows
            if position >= unit.row_stop:
                break
        schema = parquet.schema_arrow
    return pa.Table.from_batches(pieces, schema=schema)


def _overlapping_groups(metadata: pq.FileMetaData, unit: WorkUnit) -> tuple[int, list[int]]:
    """The first row of the first row group the unit overlaps, and every row group it overlaps."""
    groups: list[int] = []
    start = first_start = 0
    for index in range(metadata.num_row_groups):
        stop = start + metadata.row_group(index).num_rows
        if stop > unit.row_start and start < unit.row_stop:
            first_start = first_start if groups else start
            groups.append(index)
        start = stop
    return first_start, groups
