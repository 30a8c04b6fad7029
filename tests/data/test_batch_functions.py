import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.pipeline import ScoreUnits, commit_units, tokenize_units, unit_rows
from jobs.ranking import CUT_COLUMN, POSITION_COLUMN, input_positions, rank_group
from jobs.scoring import encoded_from_table, tokenize_table, valid_text_mask
from jobs.storage import locate
from jobs.units import WorkUnit, plan_units, read_unit
from reranker.settings import ModelSettings
from tests.helpers import damage_data_page

pytestmark = pytest.mark.data


def test_valid_text_mask_flags_null_empty_and_blank():
    """Null, empty and whitespace-only strings are not scorable."""
    mask = valid_text_mask(pa.array(["ok", None, "", "   ", "x"]))
    assert mask.tolist() == [True, False, False, False, True]


def test_all_null_column_is_never_valid():
    """An all-null (null-typed) column has nothing to score."""
    assert valid_text_mask(pa.array([None, None], pa.null())).tolist() == [False, False]


def run_stages(tmp_path, model_dir, table: pa.Table, rows_per_unit: int) -> pa.Table:
    """A table through tokenize_units -> ScoreUnits -> commit_units, as the job chains them."""
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=3)
    source, output = locate(str(tmp_path), {}), locate(str(tmp_path / "out"), {})
    groups = [pq.ParquetFile(tmp_path / "in.parquet").metadata.row_group(i).num_rows for i in range(2)]
    units = plan_units([str(tmp_path / "in.parquet")], [groups], rows_per_unit)
    settings = ModelSettings(model=str(model_dir))
    tokenized = tokenize_units(pa.Table.from_pylist(unit_rows(units)), source, settings, "query", "passage")
    scored = ScoreUnits(settings, "score")(tokenized)
    return commit_units(scored, output)


def test_stages_give_null_scores_for_bad_rows(tmp_path, tiny_model_dir, tiny_model):
    """Rows with a null or empty query/passage get a null score; others the model's float32 score."""
    table = pa.table(
        {
            "query": ["solar", None, "sun", "", "wind", "tide"],
            "passage": ["panel", "p", None, "x", "farm", "x"],
        }
    )
    committed = run_stages(tmp_path, tiny_model_dir, table.append_column("id", pa.array(range(6))), 4)
    assert committed.column("name").to_pylist() == [
        "part-00000-000000000000.parquet",
        "part-00000-000000000003.parquet",
    ]
    assert [json.loads(c)["null"] for c in committed.column("counts").to_pylist()] == [2, 1]
    out = pq.read_table(tmp_path / "out").sort_by("id")
    assert out.column_names == ["query", "passage", "id", "score"]
    assert out.schema.field("score").type == pa.float32()
    assert out.column("score").is_null().to_pylist() == [False, True, True, True, False, False]
    expected = tiny_model.score(["solar", "wind"], ["panel", "farm"]).scores
    assert np.allclose(out.column("score").to_numpy(zero_copy_only=False)[[0, 4]], expected, atol=1e-6)


def test_a_damaged_file_becomes_an_error_row_naming_it(tmp_path, tiny_model_dir):
    """A unit whose data can't be read is reported (with the file name), not raised, and not committed."""
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"query": ["a"] * 5, "passage": ["b"] * 5}), path, compression="snappy")
    damage_data_page(path)
    rows = pa.Table.from_pylist(unit_rows([WorkUnit(0, str(path), 0, 5)]))
    tokenized = tokenize_units(
        rows, locate(str(tmp_path), {}), ModelSettings(model=str(tiny_model_dir)), "query", "passage"
    )
    error = tokenized.column("error")[0].as_py()
    assert error.startswith(f"cannot read Parquet file {path}")
    assert (
        commit_units(
            ScoreUnits(ModelSettings(model=str(tiny_model_dir)), "score")(tokenized),
            locate(str(tmp_path / "o"), {}),
        )
        .column("error")[0]
        .as_py()
        == error
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("groups", "rows_per_unit", "expected"),
    [
        ([10], 10, [(0, 10)]),
        ([3, 3, 3, 3], 7, [(0, 6), (6, 12)]),
        ([25], 10, [(0, 8), (8, 16), (16, 25)]),
        ([2, 25, 2], 10, [(0, 2), (2, 10), (10, 18), (18, 27), (27, 29)]),
        ([0, 4], 10, [(0, 4)]),
    ],
)
def test_plan_units_packs_small_row_groups_and_splits_large_ones(groups, rows_per_unit, expected):
    """Units cover every row once, follow row groups where they can, and stay near the target size."""
    units = plan_units(["f"], [groups], rows_per_unit)
    assert [(u.row_start, u.row_stop) for u in units] == expected


def test_read_unit_reads_exactly_its_rows(tmp_path):
    """A unit that starts and ends inside row groups gets exactly its rows, in order."""
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"x": list(range(100))}), path, row_group_size=30)
    table = read_unit(locate(str(path), {}).fs, WorkUnit(0, str(path), 25, 71))
    assert table.column("x").to_pylist() == list(range(25, 71))


def test_rank_group_orders_ranks_and_cuts():
    """Best first, 1-based ranks, null scores last and unranked, top-k kept."""
    group = pa.table(
        {
            "qid": [7] * 4,
            "score": pa.array([0.1, None, 0.9, 0.5], pa.float32()),
            POSITION_COLUMN: pa.array([0, 1, 2, 3], pa.int64()),
        }
    )
    ranked = rank_group(group, "score", POSITION_COLUMN, add_rank=True, top_k=None)
    assert ranked.column("score").to_pylist()[:3] == pytest.approx([0.9, 0.5, 0.1])
    assert ranked.column("rank").to_pylist() == [1, 2, 3, None]
    # the tie-breaker and the cut count travel to the block's commit, which drops them
    assert ranked.column_names == ["qid", "score", POSITION_COLUMN, "rank", CUT_COLUMN]
    assert ranked.column(CUT_COLUMN).to_pylist() == [0, 0, 0, 0]
    top = rank_group(group, "score", POSITION_COLUMN, add_rank=False, top_k=2)
    assert top.num_rows == 2 and "rank" not in top.column_names
    assert np.isclose(top.column("score").to_pylist(), [0.9, 0.5]).all()
    assert top.column(CUT_COLUMN).to_pylist() == [2, 0]  # on the group's first row: what top-k left out


def test_rank_group_breaks_ties_by_input_position():
    """Equal scores keep input order whatever order the shuffle delivered them in, so top-k is stable."""
    rng = np.random.default_rng(7)
    positions = rng.permutation(12)
    group = pa.table(
        {
            "pid": pa.array(positions * 10),
            "score": pa.array(np.where(positions < 6, 1.0, 0.5), pa.float32()),
            POSITION_COLUMN: pa.array(positions, pa.int64()),
        }
    )
    ranked = rank_group(group, "score", POSITION_COLUMN, add_rank=True, top_k=4)
    assert ranked.column("pid").to_pylist() == [0, 10, 20, 30]
    assert ranked.column("rank").to_pylist() == [1, 2, 3, 4]


def test_input_positions_follow_file_then_row_order():
    """A row's position sorts by input file, then by row within it, across units."""
    first = input_positions(WorkUnit(0, "a", 0, 3)).to_pylist()
    later = input_positions(WorkUnit(0, "a", 3, 5)).to_pylist()
    next_file = input_positions(WorkUnit(1, "b", 0, 2)).to_pylist()
    assert first + later + next_file == sorted(first + later + next_file)
    assert len(set(first + later + next_file)) == 7


def test_token_offsets_are_64_bit():
    """Tokenized units carry int64 offsets: a unit can hold more than 2**31 tokens."""
    from reranker.tokenizer import EncodedPairs

    class Tokenizer:
        def tokenize(self, queries, passages, instruction=None):
            lengths = np.full(len(queries), 3)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            ids = np.arange(offsets[-1], dtype=np.int32)
            return EncodedPairs(ids, offsets, ids.copy(), np.zeros(len(queries), bool))

    table = pa.table({"query": ["a", None, "c"], "passage": ["x", "y", "z"]})
    tokens = tokenize_table(Tokenizer(), table, "query", "passage")  # type: ignore[arg-type]
    assert tokens.schema.field("input_ids").type == pa.large_list(pa.int32())
    assert tokens.schema.field("token_type_ids").type == pa.large_list(pa.int32())
    encoded, valid, _ = encoded_from_table(tokens)
    assert valid.tolist() == [True, False, True] and encoded.pair_ids() == [[0, 1, 2], [3, 4, 5]]


def test_plan_units_packs_small_files_and_keeps_large_ones_apart():
    """Files under half a unit are packed whole (in input order, up to rows_per_unit); others as before;
    the names come from each unit's first file and row, so every run plans the same units."""
    files = [f"f{i}" for i in range(7)]
    groups = [[300], [300], [300], [1000, 1000], [100], [100], [700]]
    units = plan_units(files, groups, 1000)
    assert [[part.path for part in unit.parts] for unit in units] == [
        ["f0", "f1", "f2"], ["f3"], ["f3"], ["f4", "f5"], ["f6"],
    ]  # fmt: skip
    assert [unit.num_rows for unit in units] == [900, 1000, 1000, 200, 700]
    assert units[0].name == "part-00000-000000000000.parquet" and units[3].name.startswith("part-00004-")
    assert plan_units(files, groups, 1000) == units


def test_plan_units_packs_a_hundred_thousand_tiny_files_in_linear_time():
    """100,000 one-row files pack into units of 20,000 (summing the unit being packed per file took hours)."""
    files = [f"f{i:06d}" for i in range(100_000)]
    units = plan_units(files, [[1]] * len(files), 20_000)
    assert [unit.num_rows for unit in units] == [20_000] * 5
    assert [unit.parts[-1].path for unit in units] == [f"f{i * 20_000 + 19_999:06d}" for i in range(5)]


def test_a_packed_unit_reads_and_positions_its_files_in_order(tmp_path):
    """A packed unit's rows are its files' rows in order, and its input positions match them."""
    paths = []
    for index in range(3):
        paths.append(str(tmp_path / f"{index}.parquet"))
        pq.write_table(pa.table({"x": list(range(index * 10, index * 10 + 4))}), paths[-1])
    (unit,) = plan_units(paths, [[4]] * 3, 100)
    assert len(unit.parts) == 3
    assert read_unit(locate(str(tmp_path), {}).fs, unit).column("x").to_pylist() == [
        0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23,
    ]  # fmt: skip
    positions = input_positions(unit).to_pylist()
    assert len(positions) == 12 and positions == sorted(positions)


@pytest.mark.parametrize("skip", [True, False])
def test_a_bad_file_in_a_packed_unit(tmp_path, tiny_model_dir, skip):
    """--on-bad-file skip: the packed unit keeps its good files and names the bad one in ``skipped``;
    fail: the unit is an error row naming the bad file (never committed)."""
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}.parquet")
        table = pa.table({"query": [f"q{index}"] * 5, "passage": [f"solar {i}" for i in range(5)]})
        pq.write_table(table, paths[-1], compression="snappy")
    damage_data_page(paths[1])
    units = plan_units([str(p) for p in paths], [[5]] * 3, 100)
    settings = ModelSettings(model=str(tiny_model_dir))
    rows = pa.Table.from_pylist(unit_rows(units))
    source = locate(str(tmp_path), {})
    tokenized = tokenize_units(rows, source, settings, "query", "passage", skip_bad_files=skip).to_pylist()[0]
    skipped = json.loads(tokenized["skipped"])
    assert list(skipped) == [str(paths[1])] and "cannot read Parquet file" in skipped[str(paths[1])]
    if not skip:
        assert tokenized["error"].startswith(f"cannot read Parquet file {paths[1]}")
        return
    assert tokenized["error"] is None and tokenized["name"] == units[0].name
    scored = ScoreUnits(settings, "score", position_column=POSITION_COLUMN)(pa.Table.from_pylist([tokenized]))
    committed = commit_units(scored, locate(str(tmp_path / "out"), {}))
    assert json.loads(committed.column("counts")[0].as_py())["skipped_files"] == skipped
    out = pq.read_table(tmp_path / "out")
    assert out.column("query").to_pylist() == ["q0"] * 5 + ["q2"] * 5 and out.num_rows == 10


def test_chunked_rows_keep_their_place_among_null_ones(tiny_model_dir, tiny_model):
    """With chunking, null and blank rows stay null, long rows score as their best window, and a batch
    with no scorable row at all is fine."""
    from jobs.scoring import Chunking, score_tokens, tokenizer_for

    long = " ".join(["solar panels convert sunlight"] * 60)
    tokenizer = tokenizer_for(ModelSettings(model=str(tiny_model_dir)))
    for passages in ([None, None], [None, long, " ", "wind farm", long]):
        table = pa.table({"query": ["solar"] * len(passages), "passage": pa.array(passages, pa.string())})
        scores, counts = score_tokens(tiny_model, tokenize_table(tokenizer, table, "query", "passage",
                                                                 chunking=Chunking(5, 8)))  # fmt: skip
        texts = [text for text in passages if text and text.strip()]
        expected = (
            tiny_model.score(["solar"] * len(texts), texts, max_chunks_per_doc=5).scores if texts else []
        )
        assert [score is None for score in scores.to_pylist()] == [not (t and t.strip()) for t in passages]
        np.testing.assert_allclose([s for s in scores.to_pylist() if s is not None], expected, atol=1e-6)
        assert counts["scored"] == len(texts)
