"""The Ray cluster a job runs on: the nodes alive now, and the nodes an autoscaling cluster can grow to.

A job sized from the nodes alive at start sees only the head of a cluster whose workers scale from
zero. What the cluster can become is read from the autoscaler's node types and their ``max_workers``:

1. Ray's own record of the cluster config (``ray._private.state.state.get_cluster_config()``, which
   Ray Data also reads), where the platform reports one;
2. else the autoscaler's YAML: ``--cluster-config`` when given, else ``~/ray_bootstrap_config.yaml``,
   where ``ray up`` leaves it on the head node (the node ``ray job submit`` runs the driver on).

Neither found: the cluster is taken as fixed, its alive nodes as all it has.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml

from reranker.errors import ConfigError

logger = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` writes the cluster config on the head
HEAD_RESOURCE = "node:__internal_head__"
UNLIMITED_WORKERS = 1000  # a node type without a limit (KubeRay's -1), counted as this many nodes
SCHEDULING_RESOURCES = ("CPU", "GPU")


@dataclass(frozen=True)
class NodeType:
    """A worker node type of an autoscaling cluster: each node's resources and how many may run."""

    name: str
    resources: Mapping[str, float]
    max_workers: int


@dataclass(frozen=True)
class NodeTypes:
    """The worker node types an autoscaler may start, and its limit on worker nodes in all."""

    types: tuple[NodeType, ...]
    max_workers: int = UNLIMITED_WORKERS


@dataclass(frozen=True)
class ClusterShape:
    """The resources of each node alive now, and of each node the cluster can grow to.

    On a fixed cluster (or one already at its limits) ``reachable`` is ``alive``.
    """

    alive: tuple[Mapping[str, float], ...]
    reachable: tuple[Mapping[str, float], ...]

    @classmethod
    def fixed(cls, nodes: Sequence[Mapping[str, float]]) -> ClusterShape:
        """A cluster that is what is alive: a laptop, a static cluster."""
        return cls(tuple(nodes), tuple(nodes))

    @property
    def grows(self) -> bool:
        """Whether the cluster can add CPUs or GPUs to what is alive now."""
        return any(_total(self.reachable, key) > _total(self.alive, key) for key in SCHEDULING_RESOURCES)


def cluster_shape(config_path: str | None = None) -> ClusterShape:
    """The connected cluster's shape (embedded Ray is started if none is connected).

    Args:
        config_path: The autoscaler's cluster config (YAML); default: Ray's record, else
            ``~/ray_bootstrap_config.yaml`` when it exists.
    """
    start_ray()
    alive = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    types = node_types_from_ray(alive) or node_types_from_file(config_path)
    if types is None:
        return ClusterShape.fixed(alive)
    return ClusterShape(tuple(alive), tuple(reachable_nodes(alive, types)))


def reachable_nodes(alive: Sequence[Mapping[str, float]], types: NodeTypes) -> list[Mapping[str, float]]:
    """The head as it runs now, plus every worker each node type may start (GPU types first).

    The workers stay within the autoscaler's limit on worker nodes in all.
    """
    heads = [node for node in alive if HEAD_RESOURCE in node]
    workers: list[Mapping[str, float]] = []
    for kind in sorted(types.types, key=lambda t: -t.resources.get("GPU", 0.0)):
        count = max(0, min(kind.max_workers, types.max_workers - len(workers)))
        workers.extend([dict(kind.resources)] * count)
    return [*heads, *workers]


def node_types_from_ray(alive: Sequence[Mapping[str, float]]) -> NodeTypes | None:
    """Node types from the cluster config the platform reported to Ray (none on ``ray up`` clusters).

    ``alive``: the resources of the nodes alive now (a group shaped like the head is the head's).
    """
    import ray._private.state  # Ray Data's source for the same question

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an old or partial GCS: fall back to the file
        logger.debug("no cluster config from Ray", exc_info=True)
        return None
    if config is None:
        return None
    types = [
        NodeType(group.name, dict(group.resources), _workers(group.max_count))
        for group in config.node_group_configs
        if group.resources and group.max_count != 0 and not _is_head_group(group, alive)
    ]
    return NodeTypes(tuple(types)) if types else None


def node_types_from_file(config_path: str | None) -> NodeTypes | None:
    """Node types from the autoscaler's YAML (``available_node_types``), the head's type left out.

    Raises:
        ConfigError: ``config_path`` was given and can't be read, or declares no worker node type.
    """
    path = Path(config_path or BOOTSTRAP_CONFIG).expanduser()
    if config_path is None and not path.is_file():
        return None
    try:
        types = node_types_from_config(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as error:
        raise ConfigError(f"cluster config {path}: not a cluster launcher config ({error})") from error
    if types is None and config_path is not None:
        raise ConfigError(f"cluster config {path}: no worker node type declares CPU or GPU resources")
    return types


def node_types_from_config(config: Mapping[str, Any]) -> NodeTypes | None:
    """Worker node types of a cluster launcher config; a type without declared resources is skipped.

    The launcher fills in ``resources`` for known cloud instance types when it writes the config to
    the head; a hand-written config has to declare them (the shipped ``cluster.yaml`` does).
    """
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = {key: float(value) for key, value in (spec.get("resources") or {}).items()}
        if name == head:
            continue
        if not any(resources.get(key) for key in SCHEDULING_RESOURCES):
            logger.warning("node type %s declares no CPU or GPU resources; not counted", name)
            continue
        types.append(NodeType(name, resources, _workers(spec.get("max_workers", UNLIMITED_WORKERS))))
    limit = _workers(config.get("max_workers", UNLIMITED_WORKERS))
    return NodeTypes(tuple(types), limit) if types else None


def start_ray() -> None:
    """Connect to the Ray cluster (``RAY_ADDRESS``), or start embedded Ray without the dashboard.

    Nothing of the job's uses the dashboard, and on a laptop its processes take CPU from the scoring
    actors. A cluster's own dashboard is unaffected (Ray ignores the flag when it connects to one).
    """
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, include_dashboard=False)


def _is_head_group(group: Any, alive: Sequence[Mapping[str, float]]) -> bool:
    """A group of one node shaped like the running head (Ray Data's test): the head, not a worker type."""
    heads = [resources for resources in alive if HEAD_RESOURCE in resources]
    shape = {key: float(group.resources.get(key, 0)) for key in SCHEDULING_RESOURCES}
    return group.max_count == 1 and any(
        all(head.get(key, 0.0) == value for key, value in shape.items()) for head in heads
    )


def _workers(count: int) -> int:
    return UNLIMITED_WORKERS if count < 0 else min(int(count), UNLIMITED_WORKERS)


def _total(nodes: Sequence[Mapping[str, float]], key: str) -> float:
    return sum(node.get(key, 0.0) for node in nodes)
