"""The Ray side of the job: actor pool sizing, per-actor scoring, run statistics, ranking."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from reranker.model import CrossEncoderModel
from reranker.settings import JobSettings, ModelSettings

MAX_CPUS_PER_ACTOR = 4.0


@dataclass(frozen=True)
class ActorPoolPlan:
    """How many scoring actors to start and what each one reserves."""

    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int


def plan_actor_pool(
    nodes: Sequence[Mapping[str, float]], settings: JobSettings, torch_threads: int | None = None
) -> ActorPoolPlan:
    """Size the actor pool from per-node resources.

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
        fitting = sum(math.floor(node.get("GPU", 0.0) / gpus) for node in nodes)
        threads = max(1, round(cpus))
    else:
        gpus = 0.0
        node_cpus = max((node.get("CPU", 0.0) for node in nodes), default=1.0)
        spare = max(node_cpus - settings.io_cpus, 0.0)
        per_node = max(1, math.ceil(spare / MAX_CPUS_PER_ACTOR))
        cpus = settings.cpus_per_actor or max(spare / per_node, 0.1)
        fitting = sum(
            max(0, math.floor((node.get("CPU", 0.0) - settings.io_cpus) / cpus + 1e-9)) for node in nodes
        )
        threads = max(1, round(node_cpus / max(1, math.floor(spare / cpus + 1e-9))))
    num_actors = settings.num_actors or max(1, fitting)
    return ActorPoolPlan(num_actors, cpus, gpus, torch_threads or threads)


def alive_node_resources() -> list[dict[str, float]]:
    """Resources of the alive nodes of the connected Ray cluster."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


@ray.remote(num_cpus=0)
class JobStats:
    """Counters the scoring actors report to; read once by the driver at the end."""

    def __init__(self) -> None:
        self.counts = {"rows": 0, "scored": 0, "null": 0, "truncated": 0, "tokens": 0}

    def add(self, counts: dict[str, int]) -> None:
        """Add one batch's counts."""
        for key, value in counts.items():
            self.counts[key] += value

    def snapshot(self) -> dict[str, int]:
        """Current totals."""
        return dict(self.counts)


def valid_text_mask(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where the value is a non-null string with a non-whitespace character."""
    if pa.types.is_null(column.type):
        return np.zeros(len(column), dtype=bool)
    has_text = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    return np.asarray(pc.fill_null(has_text, False).to_numpy(zero_copy_only=False), dtype=bool)


class ScoreBatch:
    """Ray Data callable class: loads the model once per actor, then scores batches of rows."""

    def __init__(
        self,
        model_settings: ModelSettings,
        query_column: str,
        passage_column: str,
        score_column: str,
        stats: ray.actor.ActorHandle | None = None,
    ) -> None:
        self.model = CrossEncoderModel(model_settings)
        self.query_column = query_column
        self.passage_column = passage_column
        self.score_column = score_column
        self.stats = stats

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Append a float32 score column; rows with a null or empty query/passage get null."""
        queries, passages = batch.column(self.query_column), batch.column(self.passage_column)
        valid = valid_text_mask(queries) & valid_text_mask(passages)
        scores = np.zeros(batch.num_rows, dtype=np.float32)
        result = self.model.score(
            pc.filter(queries, valid).to_pylist(), pc.filter(passages, valid).to_pylist()
        )
        scores[valid] = result.scores
        if self.stats is not None:
            counts = {
                "rows": batch.num_rows,
                "scored": int(valid.sum()),
                "null": int((~valid).sum()),
                "truncated": result.num_truncated,
                "tokens": result.num_tokens,
            }
            ray.get(self.stats.add.remote(counts))
        return batch.append_column(self.score_column, pa.array(scores, pa.float32(), mask=~valid))


def rank_group(group: pa.Table, score_column: str, add_rank: bool, top_k: int | None) -> pa.Table:
    """Ray Data group function: one query's rows best first (null scores last), ranked, cut to k."""
    ordered = group.sort_by([(score_column, "descending")])
    if top_k is not None:
        ordered = ordered.slice(0, top_k)
    if not add_rank:
        return ordered
    ranks = pa.array(np.arange(1, ordered.num_rows + 1, dtype=np.int32))
    return ordered.append_column("rank", pc.if_else(ordered.column(score_column).is_valid(), ranks, None))
