import logging

import pytest
import ray.data
import torch

from jobs.cluster import ClusterShape
from jobs.resources import plan_actor_pool
from jobs.settings import RescoreSettings
from reranker.errors import ConfigError
from reranker.model import default_batch_tokens, resolve_device, resolve_dtype

pytestmark = pytest.mark.unit


def test_auto_device_prefers_cuda(monkeypatch):
    """auto picks CUDA when present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_auto_device_falls_back_to_cpu(monkeypatch):
    """auto picks the CPU without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


def test_explicit_cuda_without_gpu_is_a_config_error(monkeypatch):
    """Asking for CUDA on a CPU-only machine fails clearly."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_device("cuda:0")


def test_unknown_device_is_a_config_error():
    """Nonsense device names fail naming the setting."""
    with pytest.raises(ConfigError, match="device"):
        resolve_device("quantum")


def test_precision_mapping():
    """fp16/bf16 map to half dtypes on GPU; fp16 is refused on CPU, bf16 allowed."""
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("fp16", gpu) is torch.float16
    assert resolve_dtype("bf16", gpu) is torch.bfloat16
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("fp32", cpu) is torch.float32
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_dtype("fp16", cpu)


def test_batch_token_budget_depends_on_device():
    """GPUs get a far larger padded-token budget than CPUs."""
    assert default_batch_tokens(torch.device("cuda")) > default_batch_tokens(torch.device("cpu"))


def test_gpu_cluster_gets_one_actor_per_gpu():
    """Two nodes with 4 GPUs each: 8 single-GPU actors."""
    plan = plan_actor_pool(
        ClusterShape.fixed([{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}]), RescoreSettings.load().job
    )
    assert (plan.num_actors, plan.gpus_per_actor, plan.cpus_per_actor) == (8, 1.0, 1.0)


def test_two_core_machine_leaves_a_cpu_for_io_and_uses_both_cores():
    """The 2-core laptop: one 1-CPU actor (a CPU stays free for read/write) running 2 threads."""
    plan = plan_actor_pool(ClusterShape.fixed([{"CPU": 2.0}]), RescoreSettings.load().job)
    assert (plan.num_actors, plan.cpus_per_actor, plan.torch_threads) == (1, 1.0, 2)


def test_cpu_cluster_never_reserves_every_cpu():
    """On any CPU cluster the actors leave io_cpus unreserved on every node."""
    for cpus in (1, 2, 3, 4, 8, 16, 64):
        nodes = [{"CPU": float(cpus)}] * 3
        settings = RescoreSettings.load().job
        plan = plan_actor_pool(ClusterShape.fixed(nodes), settings)
        per_node = plan.num_actors / 3
        assert per_node * plan.cpus_per_actor <= cpus - settings.io_cpus + 1e-6 or cpus <= settings.io_cpus


def test_sixteen_core_nodes_split_into_several_actors():
    """16-core nodes: four actors of 3.75 CPUs, four threads each."""
    plan = plan_actor_pool(ClusterShape.fixed([{"CPU": 16.0}, {"CPU": 16.0}]), RescoreSettings.load().job)
    assert (plan.num_actors, plan.cpus_per_actor, plan.torch_threads) == (8, 3.75, 4)


def test_explicit_pool_settings_win():
    """num_actors / cpus_per_actor / torch_threads from settings are used as given."""
    settings = RescoreSettings.load(num_actors=3, cpus_per_actor=0.5, torch_threads=1)
    plan = plan_actor_pool(ClusterShape.fixed([{"CPU": 2.0}]), settings.job, settings.model.torch_threads)
    assert (plan.num_actors, plan.cpus_per_actor, plan.torch_threads) == (3, 0.5, 1)


def test_gpus_per_actor_zero_forces_cpu_actors():
    """gpus_per_actor=0 keeps scoring on CPUs even on GPU nodes."""
    plan = plan_actor_pool(
        ClusterShape.fixed([{"CPU": 8.0, "GPU": 1.0}]), RescoreSettings.load(gpus_per_actor=0).job
    )
    assert plan.gpus_per_actor == 0.0


def test_zero_cpu_head_node_adds_no_actors():
    """A head node with CPU 0 (kept free of work) neither hosts actors nor cancels others."""
    plan = plan_actor_pool(
        ClusterShape.fixed([{"CPU": 0.0}, {"CPU": 8.0}, {"CPU": 8.0}]), RescoreSettings.load().job
    )
    assert (plan.num_actors, plan.cpus_per_actor) == (4, 3.5)


def test_rank_partitions_follow_the_input_size():
    """Small inputs rank in one partition (not Ray Data's fixed 200); large ones spread out, capped."""
    from jobs.ranking import rank_partitions

    assert [rank_partitions(n) for n in (0, 36, 100_000, 100_001, 10**9)] == [1, 1, 1, 2, 200]


def test_rank_partitions_hold_bounded_bytes_at_any_size():
    """Past 200 partitions, more are made so that none holds over RANK_PARTITION_BYTES of rows: a
    reduce task holds its partition, so its memory no longer grows with the job."""
    from jobs.ranking import RANK_PARTITION_BYTES, SCORED_ROW_EXTRA_BYTES, rank_partitions

    assert rank_partitions(10**6, 10**6 * 500) == 10  # small jobs: by rows, as before
    for rows, row_bytes in ((10**8, 450), (10**8, 1024), (10**9, 450), (10**6, 50_000)):
        partitions = rank_partitions(rows, rows * row_bytes)
        assert rows * (row_bytes + SCORED_ROW_EXTRA_BYTES) / partitions <= RANK_PARTITION_BYTES
    assert rank_partitions(10**8, 10**8 * 1024) > 200
    assert rank_partitions(10**6, 10**6 * 400, rows_per_partition=400) == 200  # a cascade's selection


def test_ranking_data_context_is_the_jobs_alone():
    """The ranking shuffles with SHUFFLE_V2 and bounded map batches whatever the process chose, and
    gives the process its own settings back."""
    from ray.data.context import ShuffleStrategy

    from jobs.ranking import RANK_MAP_BATCH_BYTES, ranking_data_context

    context = ray.data.DataContext.get_current()
    saved = (context.shuffle_strategy, context.shuffle_input_batch_bytes)
    context.shuffle_strategy, context.shuffle_input_batch_bytes = ShuffleStrategy.HASH_SHUFFLE, 7
    try:
        with ranking_data_context():
            assert context.shuffle_strategy == ShuffleStrategy.SHUFFLE_V2
            assert context.shuffle_input_batch_bytes == RANK_MAP_BATCH_BYTES
        assert (context.shuffle_strategy, context.shuffle_input_batch_bytes) == (
            ShuffleStrategy.HASH_SHUFFLE,
            7,
        )
    finally:
        context.shuffle_strategy, context.shuffle_input_batch_bytes = saved


def test_gpu_node_tokenizes_on_every_cpu_the_actors_leave():
    """An 8-GPU node with 96 CPUs: 8 GPU actors, and tokenization on the 88 CPUs they leave."""
    plan = plan_actor_pool(ClusterShape.fixed([{"CPU": 96.0, "GPU": 8.0}]), RescoreSettings.load().job)
    assert (plan.num_actors, plan.gpus_per_actor, plan.tokenize_tasks) == (8, 1.0, 88)
    one_gpu = plan_actor_pool(ClusterShape.fixed([{"CPU": 8.0, "GPU": 1.0}]), RescoreSettings.load().job)
    assert (one_gpu.num_actors, one_gpu.tokenize_tasks) == (1, 7)


def test_two_core_machine_tokenizes_beside_its_one_actor():
    """The 2-core laptop: one tokenization task at a time on the CPU the actor leaves."""
    assert plan_actor_pool(ClusterShape.fixed([{"CPU": 2.0}]), RescoreSettings.load().job).tokenize_tasks == 1


def test_object_store_budget_holds_two_units_per_stage_slot():
    """Units in flight are bounded by two per actor and tokenize task, not by the input's size."""
    from jobs.resources import MIN_OBJECT_STORE_BYTES, UNIT_BYTES_PER_ROW, object_store_budget

    job = RescoreSettings.load().job
    laptop = plan_actor_pool(ClusterShape.fixed([{"CPU": 2.0}]), job)
    assert object_store_budget(laptop, job) == MIN_OBJECT_STORE_BYTES
    gpu_node = plan_actor_pool(ClusterShape.fixed([{"CPU": 96.0, "GPU": 8.0}]), job)
    expected = 2 * (8 + 88) * job.rows_per_unit * UNIT_BYTES_PER_ROW
    assert object_store_budget(gpu_node, job) == expected
    explicit = RescoreSettings.load(object_store_mib=300).job
    assert object_store_budget(gpu_node, explicit) == 300 * 2**20


def stages(plan) -> list[tuple[str, dict, object]]:
    """(name, remote args, compute) of each operator of the job's pipeline, first to last."""
    from jobs.pipeline import UnitScoring, build_pipeline
    from jobs.storage import locate
    from jobs.units import WorkUnit

    settings = RescoreSettings.load(input="in", output="out")
    scoring = UnitScoring(locate("/tmp", {}), "query", "passage", "score")
    unit = WorkUnit(0, "/tmp/x", 0, 1)
    dataset = build_pipeline([unit], scoring, settings.model, plan, locate("/tmp/o", {}), 1.0)
    found, operator = [], dataset._logical_plan.dag
    while operator.input_dependencies:
        found.append((operator.name, operator.ray_remote_args, operator.compute))
        operator = operator.input_dependencies[0]
    return found[::-1]


@pytest.mark.usefixtures("ray_session")
def test_pipeline_has_the_same_shape_on_cpu_and_gpu_with_cluster_derived_sizes():
    """tokenize tasks -> scoring actors -> commit tasks on both; sizes and GPUs follow the plan."""
    gpu = stages(plan_actor_pool(ClusterShape.fixed([{"CPU": 96.0, "GPU": 8.0}]), RescoreSettings.load().job))
    cpu = stages(plan_actor_pool(ClusterShape.fixed([{"CPU": 2.0}]), RescoreSettings.load().job))
    names = ["MapBatches(tokenize_units)", "MapBatches(ScoreUnits)", "MapBatches(commit_units)"]
    assert [name for name, _, _ in gpu] == [name for name, _, _ in cpu] == names
    assert gpu[0][2].size == 88 and cpu[0][2].size == 1
    assert gpu[1][1]["num_gpus"] == 1.0 and gpu[1][2].min_size == gpu[1][2].max_size == 8
    assert cpu[1][1]["num_gpus"] == 0.0 and cpu[1][2].max_size == 1
    for stages_of_one in (gpu, cpu):  # remote args differ, so tokenization never fuses into the actors
        assert stages_of_one[0][1] != stages_of_one[1][1]
        assert stages_of_one[0][1]["runtime_env"]["env_vars"]["RAYON_NUM_THREADS"] == "1"


@pytest.mark.usefixtures("ray_session")
def test_the_pipeline_uses_no_deprecated_ray_data_arguments(caplog):
    """Building the job's stages raises no RayDeprecationWarning (an error in this suite, see pyproject)
    and logs no deprecation (Ray Data logs the one for map_batches(concurrency=...))."""
    ray_data_logger = logging.getLogger("ray.data")
    ray_data_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ray.data"):
            stages(
                plan_actor_pool(ClusterShape.fixed([{"CPU": 96.0, "GPU": 8.0}]), RescoreSettings.load().job)
            )
            stages(plan_actor_pool(ClusterShape.fixed([{"CPU": 2.0}]), RescoreSettings.load().job))
            ray.data.range(4).map_batches(lambda batch: batch, concurrency=1)  # the check itself bites
    finally:
        ray_data_logger.removeHandler(caplog.handler)
    deprecations = [record.getMessage() for record in caplog.records if "deprecated" in record.getMessage()]
    assert len(deprecations) == 1 and "concurrency" in deprecations[0]


def test_a_cpu_stage_1_and_a_gpu_stage_2_size_their_own_pools():
    """On an 8-GPU node (checked on CPU): a cascade's stage with gpus 0 gets CPU actors, the next one
    actor per GPU; the service gives each stage deployment the same resources by default."""
    from jobs.cascade import stage_sizing
    from serve.app import stage_resources

    settings = RescoreSettings.load(
        group_column="qid",
        cascade=[{"model": "a", "rerank_count": 20, "gpus": 0, "cpus": 4}, {"model": "b", "gpus": 1}],
    )
    node = [{"CPU": 96.0, "GPU": 8.0}]
    first, second = (
        plan_actor_pool(ClusterShape.fixed(node), stage_sizing(stage, settings.job))
        for stage in settings.stages
    )
    assert (first.gpus_per_actor, first.cpus_per_actor, first.num_actors) == (0.0, 4.0, 23)
    assert (second.gpus_per_actor, second.num_actors) == (1.0, 8)
    assert [stage_resources(stage) for stage in settings.stages] == [
        {"num_cpus": 4, "num_gpus": 0.0},
        {"num_cpus": 1.0, "num_gpus": 1},
    ]


def test_the_model_check_runs_beside_ray_start_and_its_error_still_surfaces(monkeypatch):
    """The driver's model check runs on a thread while Ray starts in the main thread (ray.init sets
    its SIGTERM handler only there); a failed check is raised as itself once both are done."""
    import threading

    from jobs import rescore
    from reranker.errors import ModelLoadError

    seen: dict[str, object] = {}

    def check(stages):
        seen["check_thread"] = threading.current_thread() is threading.main_thread()
        raise ModelLoadError("cannot load model 'x'")

    monkeypatch.setattr(rescore, "check_stages", check)
    monkeypatch.setattr(rescore, "start_ray", lambda: seen.update(ray_thread=threading.current_thread().name))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        rescore.checked_while_ray_starts([])
    assert seen == {"check_thread": False, "ray_thread": "MainThread"}
