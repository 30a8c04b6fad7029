"""Cascades: a cheap cross-encoder scores every candidate, costlier ones rescore only the best few.

One declaration, shared by the job and the service: an ordered list of stages, each a model with its
own options and how many candidates per query it passes on (``rerank_count``; the last stage scores
what it receives). A stage's unset options come from the program's model settings, so precision or
device is set once. An empty list means one model: the model settings, exactly as without a cascade.

The final order of one query's candidates: those that reached the last stage first, by its score;
then those that stopped one stage earlier, by that stage's score; and so on (as Vespa orders hits
outside a rerank window). Ties keep input order.

The reported score follows that order (``monotone_scores``), so a client that re-sorts, merges or
thresholds by score keeps the cascade's order: candidates that reached the last stage report its raw
score unchanged; a group that stopped earlier reports its own stage's scores, shifted down (in raw
logits, by one amount for the whole group, so their spacing is kept) when its best would otherwise
reach the lowest score reported above it, to ``TIER_GAP`` below that. Each stage's own score stays
available as it was (the job's per-stage columns, the service's ``stage_scores``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Self

import numpy as np
from pydantic import Field, model_validator

from reranker.settings import ModelOptions, SettingsSection

logger = logging.getLogger(__name__)
TIER_GAP = 1e-3  # raw-logit distance between a shifted group's best and the lowest score above it


class CascadeStage(ModelOptions):
    """One stage: a model (any ``ModelOptions``; unset ones come from the model settings) and its k."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]+$",
        description="Label of the stage: its score column is score_NAME (default NAME: stageN).",
    )
    rerank_count: int | None = Field(
        None, ge=1, description="Best candidates per query passed on to the next stage (last stage: unset)."
    )
    cpus: float | None = Field(None, gt=0, description="CPUs each of this stage's scorers reserves (auto).")
    gpus: float | None = Field(None, ge=0, description="GPUs each of this stage's scorers reserves (auto).")


class CascadeSettings(SettingsSection):
    """The cascade section of a program's settings (env ``RERANK_CASCADE`` as JSON, or a YAML list)."""

    cascade: list[CascadeStage] = Field(
        default_factory=list,
        description="Stages, cheapest first: [{model, rerank_count, ...}, ...] (empty: one model).",
    )

    @model_validator(mode="after")
    def _well_formed(self) -> Self:
        check_cascade(self.cascade)
        return self


def check_cascade(stages: Sequence[CascadeStage]) -> None:
    """Raise ``ValueError`` unless the stages make a cascade: 2 or more, each but the last with a k."""
    if not stages:
        return
    if len(stages) == 1:
        raise ValueError("cascade: needs 2 or more stages (one model: leave the cascade unset)")
    for number, stage in enumerate(stages[:-1], 1):
        if stage.rerank_count is None:
            raise ValueError(f"cascade: stage {number} needs rerank_count (candidates it passes on)")
    if stages[-1].rerank_count is not None:
        raise ValueError("cascade: the last stage scores what it receives; leave its rerank_count unset")
    names = stage_names(stages)
    if len(set(names)) < len(names):
        raise ValueError(f"cascade: stage names must differ ({', '.join(names)})")


def stage_names(stages: Sequence[CascadeStage]) -> list[str]:
    """Each stage's label: its ``name``, else ``stage<N>`` (1-based)."""
    return [stage.name or f"stage{number}" for number, stage in enumerate(stages, 1)]


def resolve_stages(model: ModelOptions, stages: Sequence[CascadeStage]) -> list[CascadeStage]:
    """The stages with every option a stage leaves unset taken from ``model``; no cascade: ``[model]``."""
    base = ModelOptions.model_validate(model.model_dump(include=set(ModelOptions.model_fields)))
    if not stages:
        return [CascadeStage.model_validate(base.model_dump())]
    return [
        CascadeStage.model_validate({**base.model_dump(), **stage.model_dump(exclude_unset=True)})
        for stage in stages
    ]


def model_options(stage: CascadeStage) -> ModelOptions:
    """The stage's model options alone (what ``CrossEncoderModel`` takes)."""
    return ModelOptions.model_validate(stage.model_dump(include=set(ModelOptions.model_fields)))


def warn_if_costlier_first(stages: Sequence[CascadeStage], costs: Sequence[float]) -> None:
    """Log a warning when a stage costs more per pair than the one after it (allowed, rarely wanted)."""
    names = stage_names(stages)
    for number in range(len(stages) - 1):
        if costs[number] > costs[number + 1]:
            logger.warning(
                "cascade: stage %s (%s) costs more per pair than stage %s (%s); a cascade pays off when "
                "the cheap model comes first",
                names[number],
                stages[number].model,
                names[number + 1],
                stages[number + 1].model,
            )


def cascade_order(
    stage_scores: Sequence[np.ndarray], positions: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query's final order from each stage's scores (NaN where a candidate did not reach a stage).

    Args:
        stage_scores: One array per stage, each with a score per candidate (NaN: not reached).
        positions: Tie-breaker, lowest first (default: the candidates' order).

    Returns:
        The indices best first, each candidate's final score (its last stage's, NaN if none), and
        the number of stages it reached.
    """
    scored = np.stack([np.asarray(scores, dtype=np.float64) for scores in stage_scores])
    count = scored.shape[1]
    reached = (~np.isnan(scored)).cumprod(axis=0).sum(axis=0)
    final = np.full(count, np.nan)
    has_score = reached > 0
    final[has_score] = scored[reached[has_score] - 1, np.flatnonzero(has_score)]
    ties = np.arange(count) if positions is None else np.asarray(positions)
    order = np.lexsort((ties, np.where(has_score, -final, np.inf), -reached))
    return order, final, reached


def monotone_scores(order: np.ndarray, final: np.ndarray, reached: np.ndarray) -> np.ndarray:
    """Reported raw scores that never increase along ``order`` (the output of ``cascade_order``).

    Candidates that reached the same number of stages keep their relative scores; each such group is
    shifted down as a whole, only when needed, to ``TIER_GAP`` below the lowest score reported above
    it. Those that reached the last stage are never shifted; NaN (no score) stays NaN.
    """
    reported = np.asarray(final, dtype=np.float64).copy()
    floor = np.inf
    for depth in sorted({int(d) for d in reached[order] if d > 0}, reverse=True):
        members = (reached == depth) & ~np.isnan(reported)
        if not members.any():
            continue
        best = reported[members].max()
        if best >= floor:
            reported[members] -= best - floor + TIER_GAP
        floor = reported[members].min()
    return reported


def top_candidates(scores: np.ndarray, count: int, positions: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``count`` best scored candidates, ascending (NaN never chosen; ties: lower position)."""
    scores = np.asarray(scores, dtype=np.float64)
    ties = np.arange(len(scores)) if positions is None else np.asarray(positions)
    valid = np.flatnonzero(~np.isnan(scores))
    best = valid[np.lexsort((ties[valid], -scores[valid]))][:count]
    return np.sort(best)
