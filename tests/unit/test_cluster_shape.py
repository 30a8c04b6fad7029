"""What an autoscaling cluster can grow to, and the pools planned for it (no Ray started)."""

from __future__ import annotations

import pytest
import yaml
from ray.core.generated import autoscaler_pb2

from jobs import cluster
from jobs.cluster import ClusterShape, NodeType, NodeTypes, node_types_from_config, reachable_nodes
from jobs.resources import PoolRequest, plan_actor_pool
from jobs.settings import RescoreSettings
from reranker.errors import ConfigError
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.unit
HEAD = {"CPU": 0.0, "node:__internal_head__": 1.0, "memory": 8e9}


def shipped_types() -> NodeTypes:
    types = node_types_from_config(yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text()))
    assert types is not None
    return types


def test_the_shipped_cluster_config_offers_gpu_and_cpu_workers_beside_a_zero_cpu_head():
    """cluster.yaml: 8 GPU workers (4 CPUs, 1 GPU), 4 CPU workers (16 CPUs), 12 workers at most."""
    types = shipped_types()
    assert {kind.name: (dict(kind.resources), kind.max_workers) for kind in types.types} == {
        "gpu_worker": ({"CPU": 4.0, "GPU": 1.0}, 8),
        "cpu_worker": ({"CPU": 16.0}, 4),
    }
    assert types.max_workers == 12


def test_the_default_job_on_the_shipped_cluster_asks_for_gpu_actors_and_tokenizes_on_every_cpu():
    """Only the head alive: GPU actors, from 1 up to one per GPU node; tokenization on the 88 CPUs left."""
    shape = ClusterShape((HEAD,), tuple(reachable_nodes([HEAD], shipped_types())))
    assert shape.grows
    plan = plan_actor_pool(shape, RescoreSettings.load().job)
    assert (plan.min_size, plan.num_actors, plan.gpus_per_actor, plan.cpus_per_actor) == (1, 8, 1.0, 1.0)
    assert plan.tokenize_tasks == 8 * 4 + 4 * 16 - 8  # every CPU but the actors' own


def test_an_autoscaling_pool_asks_for_every_node_and_may_shrink_to_one():
    """Three GPU workers already up: 8 actors asked for; the pool may shrink to 1 (a node may be lost)."""
    alive = [HEAD, *[{"CPU": 4.0, "GPU": 1.0}] * 3]
    shape = ClusterShape(tuple(alive), tuple(reachable_nodes(alive, shipped_types())))
    plan = plan_actor_pool(shape, RescoreSettings.load().job)
    assert (plan.min_size, plan.num_actors) == (1, 8)


def test_explicit_actors_win_and_tokenization_still_follows_the_cluster():
    """--num-actors 2 --gpus-per-actor 1: a pool of 2 (which may shrink if a node goes), tokenization
    sized for every node."""
    shape = ClusterShape((HEAD,), tuple(reachable_nodes([HEAD], shipped_types())))
    plan = plan_actor_pool(shape, RescoreSettings.load(num_actors=2, gpus_per_actor=1).job)
    assert (plan.min_size, plan.num_actors, plan.gpus_per_actor) == (1, 2, 1.0)
    assert plan.tokenize_tasks == 8 * 4 + 4 * 16 - 2


def test_a_cpu_only_autoscaling_cluster_gets_cpu_actors_that_grow_with_it():
    """No GPU type: CPU actors sized for a 16-CPU worker, from 1 up to what 4 such workers hold."""
    types = NodeTypes((NodeType("cpu", {"CPU": 16.0}, 4),))
    shape = ClusterShape((HEAD,), tuple(reachable_nodes([HEAD], types)))
    plan = plan_actor_pool(shape, RescoreSettings.load().job)
    fixed = plan_actor_pool(ClusterShape.fixed([{"CPU": 16.0}] * 4), RescoreSettings.load().job)
    assert plan.gpus_per_actor == 0.0 and plan.min_size == 1
    assert (plan.num_actors, plan.cpus_per_actor) == (fixed.num_actors, fixed.cpus_per_actor)


def test_a_cluster_at_its_limits_is_planned_as_a_fixed_one():
    """Every worker the config allows is up: the plan of a static cluster (of two GPU nodes: elastic)."""
    alive = [HEAD, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    types = NodeTypes((NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 2),))
    shape = ClusterShape(tuple(alive), tuple(reachable_nodes(alive, types)))
    assert not shape.grows
    assert plan_actor_pool(shape, PoolRequest()) == plan_actor_pool(ClusterShape.fixed(alive), PoolRequest())
    assert plan_actor_pool(shape, PoolRequest()).min_actors == 1


def test_only_a_pool_on_one_node_is_fixed():
    """A laptop, or one big node, keeps a fixed pool: losing its node ends the job anyway. Once the
    actors span two nodes, or the cluster may grow, the pool may shrink to one actor so the job goes on
    when a node is lost (Ray restarts its actors on the nodes left, where a fixed pool would take the
    CPUs the tokenize and commit tasks need)."""
    job = RescoreSettings.load().job
    laptop = plan_actor_pool(ClusterShape.fixed([{"CPU": 2.0}]), job)
    assert (laptop.min_actors, laptop.min_size, laptop.num_actors) == (None, 1, 1)
    gpu_box = plan_actor_pool(ClusterShape.fixed([{"CPU": 96.0, "GPU": 8.0}]), job)
    assert (gpu_box.min_actors, gpu_box.num_actors) == (None, 8)
    head_and_one = plan_actor_pool(ClusterShape.fixed([{"CPU": 0.0}, {"CPU": 16.0, "GPU": 2.0}]), job)
    assert (head_and_one.min_actors, head_and_one.num_actors) == (None, 2)
    two_workers = plan_actor_pool(ClusterShape.fixed([{"CPU": 0.0}, {"CPU": 2.0}, {"CPU": 2.0}]), job)
    assert (two_workers.min_size, two_workers.num_actors, two_workers.cpus_per_actor) == (1, 2, 1.0)
    explicit = plan_actor_pool(ClusterShape.fixed([{"CPU": 4.0, "GPU": 1.0}] * 2), PoolRequest(num_actors=2))
    assert (explicit.min_size, explicit.num_actors) == (1, 2)
    one_node_explicit = plan_actor_pool(ClusterShape.fixed([{"CPU": 8.0}]), PoolRequest(num_actors=3))
    assert (one_node_explicit.min_actors, one_node_explicit.num_actors) == (None, 3)


def test_the_cluster_wide_worker_limit_is_kept_gpu_types_first():
    """max_workers 5 over 8 GPU + 4 CPU workers: 5 GPU workers are counted, no CPU worker."""
    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text()) | {"max_workers": 5}
    types = node_types_from_config(config)
    assert types is not None
    nodes = reachable_nodes([HEAD], types)
    assert nodes[0] is HEAD and nodes[1:] == [{"CPU": 4.0, "GPU": 1.0}] * 5


def test_the_bootstrap_config_ray_up_leaves_on_the_head_is_found(tmp_path, monkeypatch):
    """No --cluster-config: ~/ray_bootstrap_config.yaml is read when it exists, else the cluster is fixed."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cluster.node_types_from_file(None) is None
    (tmp_path / "ray_bootstrap_config.yaml").write_text((REPO_ROOT / "cluster.yaml").read_text())
    assert cluster.node_types_from_file(None) == shipped_types()


def test_a_cluster_config_that_is_missing_or_declares_no_worker_is_one_line(tmp_path):
    """A wrong --cluster-config is a settings error or a ConfigError naming the file, never a traceback."""
    with pytest.raises(ConfigError, match=r"cluster_config: no such file: .*nowhere\.yaml"):
        RescoreSettings.load(cluster_config=str(tmp_path / "nowhere.yaml"))
    (tmp_path / "empty.yaml").write_text("cluster_name: x\navailable_node_types: {head: {resources: {}}}\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: no worker node type declares CPU or GPU"):
        cluster.node_types_from_file(str(tmp_path / "empty.yaml"))
    (tmp_path / "broken.yaml").write_text("available_node_types: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not a cluster launcher config"):
        cluster.node_types_from_file(str(tmp_path / "broken.yaml"))


def test_the_node_groups_ray_records_are_read_and_the_head_group_left_out(monkeypatch):
    """Ray's record of the cluster config (KubeRay, hosted Ray) gives the types; -1 is a large limit."""
    import ray._private.state

    config = autoscaler_pb2.ClusterConfig()
    head = config.node_group_configs.add(name="head", max_count=1)
    head.resources["CPU"] = 0
    gpu = config.node_group_configs.add(name="gpu", min_count=0, max_count=-1)
    gpu.resources.update({"CPU": 8, "GPU": 1})
    off = config.node_group_configs.add(name="off", max_count=0)
    off.resources["CPU"] = 4
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)
    types = cluster.node_types_from_ray([HEAD])
    assert types is not None
    assert [(kind.name, dict(kind.resources), kind.max_workers) for kind in types.types] == [
        ("gpu", {"CPU": 8.0, "GPU": 1.0}, cluster.UNLIMITED_WORKERS)
    ]
