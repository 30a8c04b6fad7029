"""The built-in demo: write a small sample of (query, passage) pairs, then show the top passages.

python -m jobs.sample write PATH          # Parquet file with qid, pid, query, passage
python -m jobs.sample show OUTPUT [--k 3] # best passages per query from a job's output
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

SAMPLE: dict[str, list[str]] = {
    "how do solar panels generate electricity": [
        "Solar panels convert sunlight into electricity using photovoltaic cells made of silicon.",
        "When photons hit a solar cell they knock electrons loose, creating a direct current.",
        "An inverter turns the direct current from solar panels into alternating current for homes.",
        "The Great Wall of China is thousands of kilometres long and was built over centuries.",
        "Wind turbines use the kinetic energy of moving air to spin a generator.",
        "Bananas are rich in potassium and are one of the most popular fruits in the world.",
    ],
    "what causes the seasons on earth": [
        "Seasons are caused by the tilt of Earth's axis relative to its orbit around the Sun.",
        "Because of the axial tilt, each hemisphere receives more direct sunlight for part of the year.",
        "Many people believe seasons come from Earth's distance to the Sun, but the tilt matters more.",
        "A sourdough starter is a fermented mixture of flour and water used to leaven bread.",
        "The Moon's phases depend on how much of its sunlit side faces the Earth.",
        "Python is a programming language known for its readable syntax.",
    ],
    "how to keep basil plants alive indoors": [
        "Basil grown indoors needs six to eight hours of sunlight a day, so place it by a south window.",
        "Water basil when the top inch of soil is dry and make sure the pot drains well.",
        "Pinch off basil flowers so the plant keeps producing leaves instead of seeds.",
        "The stock market index fell two percent on Tuesday after the interest rate decision.",
        "Mint spreads quickly, so many gardeners grow it in containers.",
        "Jupiter is the largest planet in the solar system.",
    ],
    "symptoms of vitamin d deficiency": [
        "Vitamin D deficiency can cause fatigue, bone pain, muscle weakness and frequent infections.",
        "In children, a severe lack of vitamin D leads to rickets, which softens and weakens bones.",
        "Sunlight on the skin is the main natural source of vitamin D for most people.",
        "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
        "Vitamin C is found in citrus fruits and helps the immune system.",
        "A marathon is a long-distance race of 42.195 kilometres.",
    ],
}


def sample_table() -> pa.Table:
    """The demo pairs as a table: qid, pid, query, passage."""
    rows = [
        {"qid": qid, "pid": qid * 100 + pid, "query": query, "passage": passage}
        for qid, (query, passages) in enumerate(SAMPLE.items(), start=1)
        for pid, passage in enumerate(passages)
    ]
    return pa.Table.from_pylist(rows)


def show_top(output: str, k: int, score_column: str = "score") -> str:
    """Format the k best passages of each query in a job's output directory."""
    table = pads.dataset(output, format="parquet").to_table()
    lines = []
    for query in sorted(set(table.column("query").to_pylist())):
        rows = table.filter(pc.equal(table.column("query"), query))
        best = rows.sort_by([(score_column, "descending")]).slice(0, k).to_pylist()
        lines.append(f"\n{query}")
        lines.extend(f"  {row[score_column]:+.4f}  {row['passage'][:90]}" for row in best)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``write PATH`` or ``show OUTPUT``."""
    parser = argparse.ArgumentParser(prog="python -m jobs.sample")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("write").add_argument("path")
    show = commands.add_parser("show")
    show.add_argument("output")
    show.add_argument("--k", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "write":
        pq.write_table(sample_table(), args.path)
        print(f"wrote {sample_table().num_rows} sample pairs to {args.path}")
    else:
        print(show_top(args.output, args.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
