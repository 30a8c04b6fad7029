"""TREC files: qrels, run files, and the ``qid pid query passage`` TSV of MS MARCO candidate lists.

    python -m jobs.trec to-parquet top1000.tsv pairs.parquet   # TSV candidates -> rescoring input

Every reader takes a local path or an fsspec URI. Run files are read in chunks so that a caller can
bound its memory (see ``jobs.evaluate``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from reranker.errors import InputError

RUN_CHUNK_ROWS = 1_000_000
_TSV_COLUMNS = ["qid", "pid", "query", "passage"]


def read_qrels(uri: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """TREC qrels (``qid iteration docno grade``) as ``query_id``, ``doc_id`` (str), ``relevance`` (int).

    Raises:
        InputError: The file is missing, unreadable or not in qrels format; the message names it.

    """
    frame = pd.concat(
        list(_read_columns(uri, storage_options, "qrels", {0: "query_id", 2: "doc_id", 3: "relevance"}))
    )
    if frame.empty:
        raise InputError(f"qrels {uri} holds no judgments")
    return frame.astype({"relevance": "int64"})


def iter_run_file(
    uri: str, storage_options: dict[str, Any] | None = None, chunk_rows: int = RUN_CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """A TREC run file (``qid Q0 docno rank score tag``) in chunks of ``query_id``, ``doc_id``, ``score``.

    Raises:
        InputError: The file is missing or not in run format; the message names it.

    """
    columns = {0: "query_id", 2: "doc_id", 4: "score"}
    yield from _read_columns(uri, storage_options, "run file", columns, chunk_rows)


def _read_columns(
    uri: str,
    storage_options: dict[str, Any] | None,
    what: str,
    columns: dict[int, str],
    chunk_rows: int = RUN_CHUNK_ROWS,
) -> Iterator[pd.DataFrame]:
    """Chunks of some whitespace-separated columns (ids as str, the last one as a number)."""
    names = list(columns.values())
    try:
        with fsspec.open(uri, "rt", **(storage_options or {})) as handle:
            yield from pd.read_csv(
                handle,
                sep=r"\s+",
                header=None,
                usecols=list(columns),
                names=names,
                dtype={names[0]: str, names[1]: str, names[2]: "float64"},
                chunksize=chunk_rows,
            )
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"cannot read {what} {uri}: {str(exc).splitlines()[0]}") from exc


def tsv_to_parquet(source: str, destination: str, storage_options: dict[str, Any] | None = None) -> int:
    """Convert a ``qid<TAB>pid<TAB>query<TAB>passage`` file (no header) to Parquet; returns rows written.

    Text is kept verbatim (no quoting rules); ``qid`` and ``pid`` become int64.
    """
    options = storage_options or {}
    read_options = pacsv.ReadOptions(column_names=_TSV_COLUMNS, block_size=1 << 24)
    parse_options = pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False)
    convert_options = pacsv.ConvertOptions(
        column_types={"qid": pa.int64(), "pid": pa.int64(), "query": pa.string(), "passage": pa.string()},
        strings_can_be_null=False,
    )
    rows = 0
    try:
        with fsspec.open(source, "rb", **options) as raw, fsspec.open(destination, "wb", **options) as out:
            reader = pacsv.open_csv(raw, read_options, parse_options, convert_options)
            with pq.ParquetWriter(out, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot convert {source}: {str(exc).splitlines()[0]}") from exc
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``to-parquet SOURCE.tsv DESTINATION.parquet``."""
    parser = argparse.ArgumentParser(prog="python -m jobs.trec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("to-parquet", help="TREC/MS MARCO candidate TSV -> Parquet")
    convert.add_argument("source")
    convert.add_argument("destination")
    args = parser.parse_args(argv)
    try:
        rows = tsv_to_parquet(args.source, args.destination)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {rows} pairs to {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
