"""Sizing the scoring actor pool from the cluster, and the object store the job may fill.

One actor per GPU when there are GPUs; otherwise CPU actors that leave ``io_cpus`` free on every node
(an actor pool that takes every CPU deadlocks Ray Data). On a cluster that can grow (``jobs.cluster``)
the pool is sized for every node the autoscaler may start, and tokenization may use every CPU those
nodes leave. A pool that spans several nodes, or a cluster that grows, may shrink to one actor: Ray
restarts a lost node's actors elsewhere, and a pool that cannot shrink would then hold the CPUs the
tokenize and commit tasks need, and the job would stop. Used by the job and by ``jobs.stage``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from jobs.cluster import ClusterShape
from jobs.settings import JobSettings

MAX_CPUS_PER_ACTOR = 4.0
# In flight per row, measured on MS MARCO text: ~0.45 KiB of text (it travels twice), ~0.8 KiB of tokens.
UNIT_BYTES_PER_ROW = 2048
MIN_OBJECT_STORE_BYTES = 512 * 2**20


class PoolSizing(Protocol):
    """What a caller asks of the scoring actor pool (``JobSettings`` is one); None: from the cluster."""

    @property
    def num_actors(self) -> int | None: ...  # noqa: D102

    @property
    def cpus_per_actor(self) -> float | None: ...  # noqa: D102

    @property
    def gpus_per_actor(self) -> float | None: ...  # noqa: D102

    @property
    def io_cpus(self) -> float: ...  # noqa: D102


@dataclass(frozen=True)
class PoolRequest:
    """A ``PoolSizing`` given as plain values (the Ray Data stage's arguments)."""

    num_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    io_cpus: float = 1.0


@dataclass(frozen=True)
class ActorPoolPlan:
    """How many scoring actors to run and what each one reserves.

    ``num_actors`` is the most, and the pool starts with them all. An elastic pool may shrink to
    ``min_actors`` (``None``: a fixed pool, on one node). ``tokenize_tasks`` is the most tokenization
    tasks at once.
    """

    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    tokenize_tasks: int = 1
    min_actors: int | None = None

    @property
    def min_size(self) -> int:
        """The actors the pool never goes below."""
        return self.num_actors if self.min_actors is None else self.min_actors


def plan_actor_pool(
    cluster: ClusterShape, settings: PoolSizing, torch_threads: int | None = None
) -> ActorPoolPlan:
    """Size the actor pool for the cluster: every node it may have, elastic where a node may be lost.

    A cluster that can grow gets the pool that fits every node it may start (GPU actors when it offers
    GPU nodes). An explicit ``num_actors`` is the pool's size on any cluster; its tokenization is still
    sized for every node. A pool on one node of a fixed cluster is fixed (losing that node ends the job
    anyway); any other may shrink to one actor, so that the job goes on with the nodes left when one is
    lost (Ray Data shrinks a pool whose actors wait for input or whose nodes are gone; it grows back
    when its actors have work queued).
    """
    full = plan_for_nodes(cluster.reachable, settings, torch_threads)
    if not cluster.grows and _nodes_holding(cluster.alive, full, settings.io_cpus) <= 1:
        return full
    return replace(full, min_actors=1)


def plan_for_nodes(
    nodes: Sequence[Mapping[str, float]], settings: PoolSizing, torch_threads: int | None = None
) -> ActorPoolPlan:
    """Size a fixed actor pool from per-node resources.

    One actor per GPU when the cluster has GPUs. Otherwise CPU actors of at most
    ``MAX_CPUS_PER_ACTOR`` CPUs that leave ``io_cpus`` unreserved on every node, so listing, read
    and write tasks can always be scheduled (an actor pool that takes every CPU deadlocks).
    torch threads default to the node's cores shared among its actors: Ray would otherwise cap
    them at the reserved CPUs through ``OMP_NUM_THREADS``.

    Args:
        nodes: Resources of each alive node, e.g. ``{"CPU": 16.0, "GPU": 1.0}``.
        settings: Explicit ``num_actors`` / ``cpus_per_actor`` / ``gpus_per_actor`` win over the
            derived values.
        torch_threads: The model setting; when given it wins over the derived thread count.

    """
    total_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    use_gpus = settings.gpus_per_actor if settings.gpus_per_actor is not None else total_gpus > 0
    if use_gpus:
        gpus = settings.gpus_per_actor or 1.0
        cpus = settings.cpus_per_actor or 1.0
        threads = max(1, round(cpus))
    else:
        gpus = 0.0
        node_cpus = max((node.get("CPU", 0.0) for node in nodes), default=1.0)
        spare = max(node_cpus - settings.io_cpus, 0.0)
        per_node = max(1, math.ceil(spare / MAX_CPUS_PER_ACTOR))
        cpus = settings.cpus_per_actor or max(spare / per_node, 0.1)
        threads = max(1, round(node_cpus / max(1, math.floor(spare / cpus + 1e-9))))
    plan = ActorPoolPlan(1, cpus, gpus, torch_threads or threads)
    num_actors = settings.num_actors or max(1, _fitting(nodes, plan, settings.io_cpus))
    tokenize_tasks = _tokenize_slots(nodes, num_actors * cpus, settings.io_cpus)
    return replace(plan, num_actors=num_actors, tokenize_tasks=tokenize_tasks)


def _fitting(nodes: Sequence[Mapping[str, float]], plan: ActorPoolPlan, io_cpus: float) -> int:
    """How many of the plan's actors the nodes hold.

    One per ``gpus_per_actor`` GPUs on GPU nodes; on CPUs, those that leave ``io_cpus`` free on each node.
    """
    if plan.gpus_per_actor:
        return sum(math.floor(node.get("GPU", 0.0) / plan.gpus_per_actor) for node in nodes)
    return sum(
        max(0, math.floor((node.get("CPU", 0.0) - io_cpus) / plan.cpus_per_actor + 1e-9)) for node in nodes
    )


def _nodes_holding(nodes: Sequence[Mapping[str, float]], plan: ActorPoolPlan, io_cpus: float) -> int:
    """How many of the nodes hold at least one of the plan's actors."""
    return sum(1 for node in nodes if _fitting([node], plan, io_cpus) > 0)


def object_store_budget(pool: ActorPoolPlan, settings: JobSettings) -> int:
    """Bytes of object store the job's units in flight may take (Ray Data's default: half the store).

    Two units per tokenize task and per actor keep every stage fed; more only queues tokenized units
    ahead of the actors, which costs memory and buys no speed.
    """
    if settings.object_store_mib is not None:
        return settings.object_store_mib * 2**20
    slots = pool.num_actors + pool.tokenize_tasks
    return max(MIN_OBJECT_STORE_BYTES, 2 * slots * settings.rows_per_unit * UNIT_BYTES_PER_ROW)


def _tokenize_slots(nodes: Sequence[Mapping[str, float]], actor_cpus: float, io_cpus: float) -> int:
    """Concurrent tokenization tasks: the CPUs the scoring actors leave, one slot per ``io_cpus``.

    On a GPU node that is most of its cores (a GPU scores far faster than one core tokenizes);
    on a CPU node it is the ``io_cpus`` share left beside the actors.
    """
    free = sum(node.get("CPU", 0.0) for node in nodes) - actor_cpus
    return max(1, math.floor(free / io_cpus + 1e-9))
