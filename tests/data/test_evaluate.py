import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.evaluate import main, top_ranked, trec_order
from tests.helpers import DL19_QRELS, DL19_TSV, DL20_QRELS, DL20_TSV, read_trec_tsv, require

pytestmark = pytest.mark.data
ir_measures = pytest.importorskip("ir_measures", reason="the eval extra (ir-measures) is not installed")
pytrec_eval = pytest.importorskip("pytrec_eval", reason="ir-measures' trec_eval binding is not installed")


def write_qrels(path, rows) -> str:
    path.write_text("".join(f"{qid} 0 {doc} {grade}\n" for qid, doc, grade in rows))
    return str(path)


def run_cli(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def random_run(seed: int, queries: int = 20, docs: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "query_id": np.repeat([f"q{i}" for i in range(queries)], docs),
            "doc_id": [f"d{j}" for _ in range(queries) for j in rng.permutation(docs)],
            "score": rng.integers(0, 20, queries * docs).astype(float),  # many ties
        }
    )


def test_streaming_cut_equals_one_pass():
    """Cutting to the top 100 chunk by chunk keeps exactly the rows one full sort keeps."""
    run = random_run(0)
    chunks = [run.iloc[i : i + 700] for i in range(0, len(run), 700)]
    streamed = top_ranked(chunks, depth=100, buffer_rows=1000).reset_index(drop=True)
    whole = trec_order(run, depth=100).reset_index(drop=True)
    pd.testing.assert_frame_equal(streamed, whole)
    assert streamed.groupby("query_id").size().max() == 100


def test_ties_follow_trec_eval_order(tmp_path, capsys):
    """Tied scores are broken as trec_eval does (docno descending), for every measure."""
    docs = [f"doc{c}" for c in "abcdefghijkl"]
    run = pd.DataFrame({"qid": ["1"] * 12, "pid": docs, "score": [1.0] * 12})
    pq.write_table(pa.Table.from_pandas(run), tmp_path / "run.parquet")
    # trec_eval puts docl..docc in its top 10; only those are judged, two of them relevant.
    judged = [("1", doc, 2 if doc in ("docl", "docd") else 0) for doc in docs[2:]]
    qrels = write_qrels(tmp_path / "qrels.txt", judged)
    code, result, _ = run_cli(capsys, "--scores", str(tmp_path / "run.parquet"), "--qrels", qrels)
    assert code == 0 and result is not None
    evaluator = pytrec_eval.RelevanceEvaluator(
        {"1": {doc: grade for _, doc, grade in judged}}, {"ndcg_cut.10", "recip_rank"}, relevance_level=2
    )
    reference = evaluator.evaluate({"1": dict.fromkeys(docs, 1.0)})["1"]
    assert result["ndcg@10"] == pytest.approx(reference["ndcg_cut_10"], abs=1e-4)
    assert result["mrr@10"] == pytest.approx(reference["recip_rank"], abs=1e-4) == 1.0
    assert result["judged@10"] == 1.0 and result["queries"] == 1


def test_run_file_equals_parquet_scores(tmp_path, capsys):
    """A TREC run file and a Parquet dataset of the same scores evaluate the same."""
    run = random_run(1, queries=5, docs=50)
    qrels = write_qrels(
        tmp_path / "qrels.txt", [(q[1:], d, int(d[1:]) % 4) for q in ["q0", "q1"] for d in run.doc_id[:40]]
    )
    run = run.assign(query_id=run.query_id.str[1:])
    (tmp_path / "run.txt").write_text(
        "".join(f"{r.query_id} Q0 {r.doc_id} 0 {r.score} tag\n" for r in run.itertuples())
    )
    pq.write_table(
        pa.Table.from_pandas(run.rename(columns={"query_id": "qid", "doc_id": "pid"})), tmp_path / "s.parquet"
    )
    _, from_run, _ = run_cli(capsys, "--run", str(tmp_path / "run.txt"), "--qrels", qrels)
    _, from_parquet, _ = run_cli(capsys, "--scores", str(tmp_path / "s.parquet"), "--qrels", qrels)
    assert from_run == from_parquet and from_run is not None and from_run["queries"] == 2


def test_a_rank_column_orders_like_the_scores_it_came_from(tmp_path, capsys):
    """--rank-column (a cascade's output) evaluates as the scores that produced those ranks."""
    run = random_run(2, queries=4, docs=30)
    run["score"] = np.random.default_rng(3).permutation(len(run)).astype(float)  # no ties
    qrels = write_qrels(
        tmp_path / "qrels.txt",
        [(q, d, int(d[1:]) % 4) for q, d in zip(run.query_id, run.doc_id, strict=True)],
    )
    ranks = run.groupby("query_id")["score"].rank(ascending=False, method="first").astype(int)
    table = run.assign(rank=ranks, score=0.0).rename(columns={"query_id": "qid", "doc_id": "pid"})
    pq.write_table(pa.Table.from_pandas(table), tmp_path / "ranked.parquet")
    pq.write_table(
        pa.Table.from_pandas(run.rename(columns={"query_id": "qid", "doc_id": "pid"})), tmp_path / "s.parquet"
    )
    _, by_score, _ = run_cli(capsys, "--scores", str(tmp_path / "s.parquet"), "--qrels", qrels)
    _, by_rank, _ = run_cli(
        capsys, "--scores", str(tmp_path / "ranked.parquet"), "--qrels", qrels, "--rank-column", "rank"
    )
    assert by_rank == by_score and by_score is not None and by_score["ndcg@10"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qrels", "QRELS"], "exactly one of --scores"),
        (["--scores", "SCORES"], "--qrels is required"),
        (["--scores", "SCORES", "--qrels", "QRELS", "--doc-column", "docno"], "column 'docno' not found"),
        (["--scores", "SCORES", "--qrels", "missing.txt"], "cannot read qrels"),
        (["--scores", "SCORES", "--qrels", "OTHER"], "no query of the run has judgments"),
    ],
    ids=["no-run", "no-qrels", "missing-column", "missing-qrels", "disjoint-queries"],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    """Bad flags or inputs: exit 2 and one line naming the problem."""
    pq.write_table(pa.table({"qid": [1, 1], "pid": [5, 6], "score": [0.5, 0.1]}), tmp_path / "s.parquet")
    paths = {
        "SCORES": str(tmp_path / "s.parquet"),
        "QRELS": write_qrels(tmp_path / "q.txt", [("1", "5", 2)]),
        "OTHER": write_qrels(tmp_path / "o.txt", [("7", "5", 2)]),
        "missing.txt": str(tmp_path / "missing.txt"),
    }
    code, _, err = run_cli(capsys, *[paths.get(arg, arg) for arg in args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_library_is_one_clear_line(tmp_path, capsys, monkeypatch):
    """Without ir-measures the job names the extra to install."""
    monkeypatch.setitem(__import__("sys").modules, "ir_measures", None)
    pq.write_table(pa.table({"qid": [1], "pid": [5], "score": [0.5]}), tmp_path / "s.parquet")
    qrels = write_qrels(tmp_path / "q.txt", [("1", "5", 2)])
    code, _, err = run_cli(capsys, "--scores", str(tmp_path / "s.parquet"), "--qrels", qrels)
    assert code == 2 and "pip install 'ray-rerank[eval]'" in err


@pytest.mark.shared
@pytest.mark.parametrize(
    ("tsv", "qrels", "expected"),
    [(DL19_TSV, DL19_QRELS, 0.5058), (DL20_TSV, DL20_QRELS, 0.4796)],
    ids=["dl19", "dl20"],
)
def test_bm25_order_reproduces_reference(tmp_path, capsys, tsv, qrels, expected):
    """BM25's own order (score = 100 - rank) scores the published nDCG@10, equal to ir-measures."""
    frame = read_trec_tsv(require(tsv))[["qid", "pid"]]
    frame["score"] = 100.0 - (frame.groupby("qid").cumcount() + 1)
    pq.write_table(pa.Table.from_pandas(frame), tmp_path / "bm25.parquet")
    code, result, _ = run_cli(
        capsys, "--scores", str(tmp_path / "bm25.parquet"), "--qrels", str(require(qrels))
    )
    assert code == 0 and result is not None
    assert round(result["ndcg@10"], 4) == expected
    run = frame.rename(columns={"qid": "query_id", "pid": "doc_id"}).astype({"query_id": str, "doc_id": str})
    reference = ir_measures.calc_aggregate(
        [ir_measures.nDCG @ 10, ir_measures.RR(rel=2) @ 10, ir_measures.R(rel=2) @ 100],
        ir_measures.read_trec_qrels(str(qrels)),
        run,
    )
    assert result["ndcg@10"] == round(reference[ir_measures.nDCG @ 10], 4)
    assert result["mrr@10"] == round(reference[ir_measures.RR(rel=2) @ 10], 4)
    assert result["recall@100"] == round(reference[ir_measures.R(rel=2) @ 100], 4)
