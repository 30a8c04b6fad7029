"""The Ray Data stage on a user's Dataset: every column kept, a score added, the job's shape and scores."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
import yaml

from jobs import stage
from jobs.cluster import ClusterShape, node_types_from_config, reachable_nodes
from jobs.rescore import main
from reranker.errors import InputError
from reranker.model import CrossEncoderModel
from tests.helpers import REPO_ROOT, fake_hub_cache

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

ROWS = [
    {"qid": 1, "query": "how do solar panels work", "passage": "solar panels convert sunlight", "lang": "en"},
    {"qid": 1, "query": "how do solar panels work", "passage": "bananas are yellow", "lang": "en"},
    {"qid": 2, "query": "what causes seasons", "passage": "the tilt of the earth axis", "lang": "en"},
    {"qid": 2, "query": "what causes seasons", "passage": "die erde ist rund", "lang": "de"},
    {"qid": 3, "query": "basil plant water", "passage": None, "lang": "en"},
    {"qid": 3, "query": "   ", "passage": "water basil when dry", "lang": "en"},
]


def readme_example() -> str:
    """The README's Ray Data example, verbatim (the code block after its marker)."""
    text = (REPO_ROOT / "README.md").read_text()
    found = re.search(r"<!-- ray-data-example -->\s*```python\n(.*?)```", text, re.S)
    assert found, "README has no Ray Data example"
    return found.group(1)


def test_the_readme_example_runs_and_matches_the_job(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """The README example (read JSON lines, filter, add scores, write) runs as written; its scores equal
    the job's on the same rows, null where a text is null or blank; the job leaves DataContext as it was."""
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    monkeypatch.chdir(tmp_path)
    code = readme_example()
    for constant, value in (("DATA", str(tmp_path)), ("MODEL", str(tiny_model_dir))):
        code, count = re.subn(rf"^{constant} = .*$", f"{constant} = {value!r}", code, flags=re.M)
        assert count == 1, f"the example sets {constant} once"
    exec(compile(code, "README.md", "exec"), {})
    scored = pq.read_table(tmp_path / "scored").sort_by([("qid", "ascending"), ("passage", "ascending")])
    assert scored.column_names == ["qid", "query", "passage", "lang", "score"]
    assert set(scored.column("lang").to_pylist()) == {"en"} and scored.num_rows == 5
    english = pa.Table.from_pylist(
        [row for row in ROWS if row["lang"] == "en"], schema=scored.schema.remove(4)
    )
    pq.write_table(english, tmp_path / "en.parquet")
    context = ray.data.DataContext.get_current()
    before = (context.execution_options.resource_limits, context.max_consecutive_actor_init_deaths)
    assert main(["--model", str(tiny_model_dir), "--input", "en.parquet", "--output", "job"]) == 0
    capsys.readouterr()
    after = ray.data.DataContext.get_current()  # the job restores the settings it changed
    assert (after.execution_options.resource_limits, after.max_consecutive_actor_init_deaths) == before
    job = pq.read_table(tmp_path / "job").sort_by([("qid", "ascending"), ("passage", "ascending")])
    assert scored.column("score").is_null().to_pylist() == job.column("score").is_null().to_pylist()
    assert scored.column("score").null_count == 2
    np.testing.assert_allclose(
        scored.column("score").to_numpy(zero_copy_only=False),
        job.column("score").to_numpy(zero_copy_only=False),
        atol=1e-6,
    )


def test_a_from_items_dataset_keeps_its_columns_and_order(tiny_model_dir, tiny_model: CrossEncoderModel):
    """from_items: every column and row comes back, scores equal the model class, no global state changed."""
    context = ray.data.DataContext.get_current()
    before = (context.execution_options.resource_limits, context.max_consecutive_actor_init_deaths)
    rows = [{**row, "position": i} for i, row in enumerate(ROWS) if row["passage"] and row["query"].strip()]
    result = stage.add_scores(ray.data.from_items(rows), str(tiny_model_dir), score_column="relevance")
    table = pa.Table.from_pylist(result.take_all()).sort_by("position")  # a few rows: fine to collect
    assert table.column_names == ["qid", "query", "passage", "lang", "position", "relevance"]
    expected = tiny_model.score(table.column("query").to_pylist(), table.column("passage").to_pylist()).scores
    np.testing.assert_allclose(table.column("relevance").to_numpy(), expected, atol=1e-6)
    after = ray.data.DataContext.get_current()
    assert (after.execution_options.resource_limits, after.max_consecutive_actor_init_deaths) == before


def test_the_stage_has_the_jobs_shape_on_a_gpu_cluster(monkeypatch, tiny_model_dir):
    """On an 8-GPU node (checked on CPU): tokenize tasks on the spare cores, one scoring actor per GPU."""
    monkeypatch.setattr(stage, "cluster_shape", lambda: ClusterShape.fixed([{"CPU": 96.0, "GPU": 8.0}]))
    result = stage.add_scores(ray.data.from_items(ROWS[:2]), str(tiny_model_dir))
    (score_name, score_args, actors), (tokenize_name, tokenize_args, tasks) = operators(result)
    assert (tokenize_name, score_name) == ("MapBatches(tokenize_rows)", "MapBatches(ScoreRows)")
    assert actors.min_size == actors.max_size == 8 and score_args["num_gpus"] == 1.0
    assert tasks.size == 88 and tokenize_args != score_args  # never fused into the GPU actors
    job_steps = job_operators(
        stage.plan_actor_pool(ClusterShape.fixed([{"CPU": 96.0, "GPU": 8.0}]), stage.PoolRequest())
    )
    (_, job_score_args, job_actors), (_, job_tokenize_args, job_tasks) = job_steps[1:]
    assert (job_score_args, job_tokenize_args) == (score_args, tokenize_args)  # the job is this stage
    assert (job_actors.max_size, job_tasks.size) == (actors.max_size, tasks.size)


def test_the_stage_follows_an_autoscaling_cluster(monkeypatch, tiny_model_dir):
    """Only the head of the shipped cluster.yaml alive: GPU actors from 1 up to 8, all asked for at once,
    and tokenization sized for every CPU the workers bring; explicit actors still set the pool's size."""
    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    head = {"CPU": 0.0, "node:__internal_head__": 1.0}
    types = node_types_from_config(config)
    assert types is not None
    shape = ClusterShape((head,), tuple(reachable_nodes([head], types)))
    monkeypatch.setattr(stage, "cluster_shape", lambda: shape)
    result = stage.add_scores(ray.data.from_items(ROWS[:2]), str(tiny_model_dir))
    (_, score_args, actors), (_, _, tasks) = operators(result)
    assert (actors.min_size, actors.initial_size, actors.max_size, score_args["num_gpus"]) == (1, 8, 8, 1.0)
    assert tasks.size == 88
    fixed = stage.add_scores(ray.data.from_items(ROWS[:2]), str(tiny_model_dir), num_actors=2)
    (_, _, actors), (_, _, tasks) = operators(fixed)
    assert (actors.min_size, actors.initial_size, actors.max_size, tasks.size) == (1, 2, 2, 94)


def operators(dataset: ray.data.Dataset) -> list[tuple[str, dict, object]]:
    """(name, remote args, compute) of each operator of a lazy dataset, last first."""
    found, operator = [], dataset._logical_plan.dag
    while operator.input_dependencies:
        found.append((operator.name, operator.ray_remote_args, operator.compute))
        operator = operator.input_dependencies[0]
    return found


def job_operators(pool) -> list[tuple[str, dict, object]]:
    """The rescoring job's operators (commit, score, tokenize) for a pool plan."""
    from jobs.pipeline import UnitScoring, build_pipeline
    from jobs.settings import RescoreSettings
    from jobs.storage import locate
    from jobs.units import WorkUnit

    settings = RescoreSettings.load(input="in", output="out")
    scoring = UnitScoring(locate("/tmp", {}), "query", "passage", "score")
    unit = WorkUnit(0, "/tmp/x", 0, 1)
    return operators(build_pipeline([unit], scoring, settings.model, pool, locate("/tmp/o", {}), 1.0))


def test_a_missing_column_is_one_line_on_the_driver(tiny_model_dir):
    """A known schema without the passage column fails before anything runs, naming the column."""
    dataset = ray.data.from_items([{"query": "q", "text": "p"}]).materialize()
    with pytest.raises(InputError, match="column 'passage' not found"):
        stage.add_scores(dataset, str(tiny_model_dir))


def test_a_hub_model_is_pinned_on_the_driver_so_every_worker_loads_one_commit(
    tiny_model_dir, larger_model_dir, tiny_model
):
    """add_scores resolves main on the driver: when main moves to other weights before the pipeline runs,
    every task and actor still loads the commit the driver saw (no mix of versions in one dataset)."""
    import os
    import uuid
    from pathlib import Path

    cache, repo_id = Path(os.environ["HF_HUB_CACHE"]), f"acme/pinned-{uuid.uuid4().hex[:8]}"
    fake_hub_cache(cache, repo_id, tiny_model_dir, "a" * 40)
    rows = [row for row in ROWS if row["passage"] and row["query"].strip()]
    scored = stage.add_scores(ray.data.from_items(rows), repo_id)  # lazy: nothing has run yet
    fake_hub_cache(cache, repo_id, larger_model_dir, "b" * 40)  # main moves to other weights
    table = pa.Table.from_pylist(scored.take_all()).sort_by([("qid", "ascending"), ("passage", "ascending")])
    expected = tiny_model.score(table["query"].to_pylist(), table["passage"].to_pylist()).scores
    np.testing.assert_allclose(table["score"].to_numpy(), expected, atol=1e-6)
