"""The job manifest a rerun trusts: what decides an output's content, and the check before a resume.

``_rescore_job.json`` is written first into a new output; a rerun resumes only if its own manifest is
the same (model version, scoring settings, layout, input files), and a finished output (``_SUCCESS``)
is left alone.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from jobs.commit import SUCCESS_NAME
from jobs.settings import RescoreSettings
from jobs.storage import InputPlan, Location, storage_call
from reranker.cascade import model_options
from reranker.errors import OutputError
from reranker.families import scoring_recipe
from reranker.loading import pinned_model
from reranker.settings import ModelOptions

MANIFEST_NAME = "_rescore_job.json"
# What the working files hold: 2, a ranked job's units keep raw logits (the activation is applied when
# ranked). An output started by an earlier version (no format_version) is not resumed: its units could
# hold activated scores, which would be activated twice.
FORMAT_VERSION = 2


SCORING_FIELDS = {
    "model",
    "revision",
    "precision",
    "max_length",
    "activation",
    "instruction",
    "true_token",
    "false_token",
    "max_chunks_per_doc",
    "chunk_overlap_tokens",
}
STAGE_FIELDS = {*SCORING_FIELDS, "name", "rerank_count"}


def job_manifest(settings: RescoreSettings, plan: InputPlan, versions: Sequence[str]) -> dict[str, Any]:
    """Everything that decides the output's content; a rerun resumes only if it is unchanged.

    ``versions`` are what each stage actually loads (``reranker.loading.model_version``): an unpinned
    hub model whose ``main`` moved, or a directory with new weights, is a different job. Each stage's
    family and chat template (``reranker.families.scoring_recipe``) are recorded beside its version.
    """
    model, job = settings.model, settings.job
    scoring: dict[str, Any] = model.model_dump(include=SCORING_FIELDS)
    if settings.cascade.cascade:
        scoring = {
            "cascade": [
                {
                    **stage.model_dump(include={*SCORING_FIELDS, "name", "rerank_count"}),
                    "model_version": version,
                    **scoring_recipe(pinned_model(model_options(stage), version)),
                }
                for stage, version in zip(settings.stages, versions, strict=True)
            ]
        }
    layout = job.model_dump(
        include={
            "query_column",
            "passage_column",
            "score_column",
            "group_column",
            "rank",
            "top_k",
            "rows_per_unit",
        }
    )
    return {
        "format_version": FORMAT_VERSION,
        **scoring,
        **layout,
        **({} if settings.cascade.cascade else _model_identity(model, versions[0])),
        "input": plan.location.path,
        "input_files": plan.file_versions(),
    }


def _model_identity(model: ModelOptions, version: str) -> dict[str, Any]:
    return {"model_version": version, **scoring_recipe(pinned_model(model, version))}


def resume_or_start(output: Location, manifest: dict[str, Any], uri: str) -> dict[str, Any] | None:
    """Record the manifest of a new output, or check a rerun against it.

    Returns:
        The stored summary when the output is already complete, else None.

    Raises:
        OutputError: The output was made by a different job; the message names what changed.

    """
    previous = read_json(output, MANIFEST_NAME)
    if previous is None:
        write_json(output, MANIFEST_NAME, manifest)
        return None
    changes = changed_fields(previous, manifest)
    if changes:
        raise OutputError(
            f"output {uri} holds a run with different settings: {'; '.join(changes[:3])}"
            f"{f' (+{len(changes) - 3} more)' if len(changes) > 3 else ''}; pass --overwrite to start fresh"
        )
    done = read_json(output, SUCCESS_NAME)
    return None if done is None else {key: done[key] for key in _STORED_SUMMARY}


_STORED_SUMMARY = (
    "rows_read",
    "rows_written",
    "pairs_scored",
    "null_scores",
    "pairs_truncated",
    "units",
    "files_skipped",
)


def write_json(location: Location, name: str, value: Any) -> None:
    """Write a small JSON file atomically (one PUT, or temp file + rename)."""
    data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    final = posixpath.join(location.path, name)

    def write() -> None:
        if not location.is_local:
            location.fs.pipe_file(final, data)
            return
        location.fs.makedirs(location.path, exist_ok=True)
        temporary = f"{final}.{uuid.uuid4().hex}.tmp"
        with location.fs.open(temporary, "wb") as handle:
            handle.write(data)
        location.fs.mv(temporary, final)

    storage_call(write, f"writing {final}")


def read_json(location: Location, name: str) -> Any | None:
    """A JSON file under ``location``, or None when absent (transient storage errors are retried)."""
    path = posixpath.join(location.path, name)

    def read() -> Any | None:
        try:
            with location.fs.open(path, "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None

    location.fs.invalidate_cache(location.path)
    return storage_call(read, f"reading {path}")


def changed_fields(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two manifests, each item naming the field and both values."""
    changes = []
    for key in sorted(set(previous) | set(current)):
        if key == "input_files":
            changes.extend(_changed_files(previous.get(key) or [], current.get(key) or []))
        elif previous.get(key) != current.get(key):
            changes.append(f"{key} ({previous.get(key)!r} -> {current.get(key)!r})")
    return changes


def _changed_files(previous: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]) -> list[str]:
    before = {entry["path"]: entry for entry in previous}
    after = {entry["path"]: entry for entry in current}
    changes = [f"input file {path} added" for path in sorted(set(after) - set(before))]
    changes += [f"input file {path} removed" for path in sorted(set(before) - set(after))]
    changes += [
        f"input file {path} changed (size or version)"
        for path in sorted(set(before) & set(after))
        if before[path] != after[path]
    ]
    return changes
