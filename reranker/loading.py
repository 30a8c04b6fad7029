"""Where a model comes from and whether it is a trained reranker, checked before any weights load.

The driver of a job (or a service's build step) calls ``check_loadable`` and ``model_version``; the
model class calls ``load_weights``. Each failure is one ``ModelLoadError`` line that names the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from reranker.errors import ConfigError, ModelLoadError
from reranker.settings import ModelOptions

logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SNAPSHOT = re.compile(r"snapshots/([0-9a-f]{40})/")
Options = TypeVar("Options", bound=ModelOptions)


def hub_options(settings: ModelOptions) -> dict[str, Any]:
    """Keyword arguments for every ``from_pretrained`` call of this model."""
    return {"revision": settings.revision, "trust_remote_code": settings.trust_remote_code}


def load_failure_message(model: str, exc: Exception) -> str:
    """One line for a model that can't be found or read, with what to do offline."""
    reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    return (
        f"cannot load model {model!r}: {reason}. "
        "If this machine has no network access, download the model where there is one "
        f"(huggingface-cli download {model} --local-dir DIR), copy DIR here, and pass "
        "--model DIR (or RERANK_MODEL=DIR)."
    )


def check_labels(model: str, num_labels: int) -> None:
    """Refuse a head that is not a relevance head (1 logit, or 2 labels read as log-odds).

    Raises:
        ModelLoadError: Any other number of labels.
    """
    if num_labels not in (1, 2):
        raise ModelLoadError(f"model {model!r} has {num_labels} labels; a reranker needs 1 (or 2)")


def untrained_weights_message(model: str, missing: set[str]) -> str:
    """One line for a checkpoint that lacks weights the reranker needs (they would be random)."""
    names = ", ".join(sorted(missing)[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
    return (
        f"model {model!r} has no trained reranker head: {names} not in its checkpoint, so scores "
        "would come from random weights (a bare encoder or a language model, not a cross-encoder?)"
    )


def check_loadable(settings: ModelOptions) -> None:
    """Fail fast, e.g. on a job's driver before any worker starts, if the model can't be used.

    Reads the config, the tokenizer and the checkpoint's tensor names (file headers, not weights):
    a local directory must hold weights, a classification head must have 1 or 2 labels and be in
    the checkpoint. A sentence-transformers model (``reranker.families``) is also built without its
    weights and prepares a probe pair: a chat template that cannot carry a query and a document, a
    causal LM without one (not a reranker), or score tokens it does not have are refused here.

    Raises:
        ModelLoadError: Unknown id, no network, no weights, not a reranker, or an untrained head.
        ConfigError: An instruction for a model that takes none, or unknown true/false tokens.
    """
    from transformers import AutoConfig, AutoTokenizer  # here: importing the module stays torch-free

    from reranker.families import SEQUENCE_CLASSIFICATION, model_family

    options = hub_options(settings)
    try:
        with _hub_warnings_silenced():  # the one error below says it all, not a warning per retry
            config = AutoConfig.from_pretrained(settings.model, **options)
            AutoTokenizer.from_pretrained(settings.model, **options)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(load_failure_message(settings.model, exc)) from exc
    local = Path(settings.model)
    if local.is_dir() and not any((local / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"cannot load model {settings.model!r}: the directory has no weights "
            f"({', '.join(WEIGHT_FILES[::2])})"
        )
    classifier = model_family(settings) == SEQUENCE_CLASSIFICATION
    if classifier:
        _check_text_pair_options(settings)
    else:
        _check_prepares_pairs(settings)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if classifier or architecture.endswith("ForSequenceClassification"):
        check_labels(settings.model, config.num_labels)  # (an LLM's lm_head, a module chain's Dense: theirs)
        _check_head_trained(settings, config)


def _check_text_pair_options(settings: ModelOptions) -> None:
    """A plain text-pair classifier has no prompt and reads no token logits.

    Raises:
        ConfigError: An instruction, or true/false tokens, were set for it.
    """
    if settings.instruction is not None:
        raise ConfigError(f"instruction: model {settings.model!r} takes none (a classifier of text pairs)")
    if settings.true_token is not None or settings.false_token is not None:
        raise ConfigError(f"true_token / false_token: model {settings.model!r} reads no token logits")


def _check_prepares_pairs(settings: ModelOptions) -> None:
    """Build the sentence-transformers model without weights and prepare a probe pair with it.

    Raises:
        ModelLoadError: It cannot prepare a query-document pair (see ``TemplatePairEncoder``).
        ConfigError: An instruction for a model that takes none.
    """
    from reranker.encoders import pair_encoder

    encoder = pair_encoder(settings)
    if settings.instruction is not None and not encoder.takes_instruction:
        raise ConfigError(f"instruction: model {settings.model!r} takes none (its input has no prompt)")


def _check_head_trained(settings: ModelOptions, config: Any) -> None:
    """Refuse a classifier whose head is not in its checkpoint (transformers would make it random)."""
    present = checkpoint_tensor_names(settings)
    if present is None:
        logger.info(
            "%s: checkpoint names not readable from headers; the head is checked at load", settings.model
        )
        return
    missing = head_parameter_names(config, settings.trust_remote_code) - present
    if missing:
        raise ModelLoadError(untrained_weights_message(settings.model, missing))


def head_parameter_names(config: Any, trust_remote_code: bool = False) -> set[str]:
    """Parameter names of the classification head for ``config`` (the model built on the meta device)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    prefix = f"{model.base_model_prefix}."
    return {name for name, _ in model.named_parameters() if not name.startswith(prefix)}


def checkpoint_tensor_names(settings: ModelOptions) -> set[str] | None:
    """Tensor names of the model's checkpoint from file headers, or None where that is not possible.

    A local directory or a hub model already in the local cache is read from disk; otherwise the hub
    serves safetensors headers alone. A hub model with only ``.bin`` weights and not cached gives None.
    """
    for name in WEIGHT_FILES:
        path = _local_file(settings, name)
        if path is not None:
            return _names_in(path)
    with contextlib.suppress(Exception):  # offline, private or .bin-only: leave it to the load check
        from huggingface_hub import get_safetensors_metadata

        metadata = get_safetensors_metadata(settings.model, revision=settings.revision)
        return set(metadata.weight_map)
    return None


def model_file(settings: ModelOptions, name: str) -> Path | None:
    """One file of the model, from its directory or the hub (at its revision); None when it has none.

    A hub model's file is downloaded (a few KB: configs, templates) or read from the cache offline; a
    file the cache cannot answer for offline counts as absent.

    Raises:
        ModelLoadError: The model itself can't be reached (unknown id, no network and not cached).
    """
    local = Path(settings.model)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        with _hub_warnings_silenced():
            return Path(hf_hub_download(settings.model, name, revision=settings.revision))
    except EntryNotFoundError:  # the repository has no such file (or, offline, the cache has none)
        return None
    except (OSError, ValueError) as exc:  # no such model, a malformed id, no network
        raise ModelLoadError(load_failure_message(settings.model, exc)) from exc


def _local_file(settings: ModelOptions, name: str) -> Path | None:
    local = Path(settings.model)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(settings.model, name, revision=settings.revision)
    return Path(cached) if isinstance(cached, str) else None


def _names_in(path: Path) -> set[str]:
    if path.name.endswith(".index.json"):
        return set(json.loads(path.read_text())["weight_map"])
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            return set(handle.keys())
    import torch

    return set(torch.load(path, map_location="meta", weights_only=True, mmap=True))


def model_version(settings: ModelOptions) -> str:
    """What exactly would be loaded: ``hub:<commit>`` for a hub model, ``dir:<digest>`` for a directory.

    A directory's digest covers the name, size and modification time of each file in it, so new
    weights (or config, or tokenizer) give a new version.

    Raises:
        ModelLoadError: The hub model's commit can't be resolved (offline and not cached).
    """
    local = Path(settings.model)
    if local.is_dir():
        files = sorted(path for path in local.iterdir() if path.is_file())
        listing = [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]
        return "dir:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return f"hub:{resolved_commit(settings)}"


def pinned_model(model: Options, version: str) -> Options:
    """The model settings workers load: a hub model pinned to the commit ``model_version`` resolved.

    Every task and actor of a job or pipeline then loads the same weights and tokenizer, even if the
    hub's ``main`` moves while it runs. A local directory is returned unchanged.
    """
    commit = version.removeprefix("hub:")
    return model.model_copy(update={"revision": commit}) if version.startswith("hub:") else model


def resolved_commit(settings: ModelOptions) -> str:
    """The hub commit that ``settings.revision`` (default: main) points at now.

    Raises:
        ModelLoadError: It can't be resolved (offline and not cached, or unknown).
    """
    from huggingface_hub import hf_hub_download

    if settings.revision and re.fullmatch(r"[0-9a-f]{40}", settings.revision):
        return settings.revision
    try:
        with _hub_warnings_silenced():
            path = hf_hub_download(settings.model, "config.json", revision=settings.revision)
    except Exception as exc:
        raise ModelLoadError(load_failure_message(settings.model, exc)) from exc
    found = _SNAPSHOT.search(Path(path).as_posix())
    if found is None:
        raise ModelLoadError(f"cannot resolve the commit of model {settings.model!r} (cached at {path})")
    return found.group(1)


@contextlib.contextmanager
def _hub_warnings_silenced() -> Iterator[None]:
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def pair_cost(settings: ModelOptions) -> float:
    """A model's relative cost per token (layers x per-layer matmul sizes), from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(settings.model, **hub_options(settings))
    hidden = getattr(config, "hidden_size", 0)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    return float(getattr(config, "num_hidden_layers", 1) * hidden * (4 * hidden + 2 * intermediate))
