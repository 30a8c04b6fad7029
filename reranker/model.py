"""The cross-encoder used unchanged by the offline job and the online service.

Pipeline per call: tokenize all pairs once (truncating to ``max_length``) -> plan length-aware
batches -> forward each batch -> post-process (relevance logit, the call's activation) -> input order.
Only this class touches the tokenizer and the weights; every per-call option is an argument, so
concurrent callers (a Serve replica's requests) never change each other's results.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from reranker.batching import pad_rows, plan_batches
from reranker.errors import ConfigError, ModelLoadError
from reranker.settings import ModelSettings
from reranker.types import Activation, TruncationSide

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CPU_BATCH_TOKENS = 2048
_GPU_BATCH_TOKENS = 65536


def resolve_device(requested: str) -> torch.device:
    """Pick the torch device: ``auto`` means CUDA when present, else CPU.

    Raises:
        ConfigError: CUDA was asked for but is not available, or the name is unknown.

    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"device: unknown device {requested!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {requested!r} requested but CUDA is not available")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Map a precision name to a dtype; fp16 is GPU-only (CPU fp16 kernels are slow or missing).

    Raises:
        ConfigError: Unknown precision, or fp16 on a CPU.

    """
    if precision not in _DTYPES:
        raise ConfigError(f"precision: expected one of {sorted(_DTYPES)}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision: fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return _DTYPES[precision]


def default_batch_tokens(device: torch.device) -> int:
    """Padded-token budget per forward pass: small on CPU (cache-bound), large on GPU."""
    return _CPU_BATCH_TOKENS if device.type == "cpu" else _GPU_BATCH_TOKENS


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of tokenized (query, passage) pairs, unpadded."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    lengths: np.ndarray
    truncated: np.ndarray


@dataclass(frozen=True)
class ScoreResult:
    """Scores in input order plus what it took to compute them."""

    scores: np.ndarray
    num_tokens: int
    num_truncated: int


class CrossEncoderModel:
    """A Hugging Face cross-encoder that scores (query, passage) pairs in length-aware batches."""

    def __init__(self, settings: ModelSettings) -> None:
        """Load tokenizer and weights once; every setting is fixed from here on.

        Raises:
            ModelLoadError: The model can't be found or read.
            ConfigError: Device or precision settings are invalid.

        """
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.precision, self.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.tokenizer, self.model = _load(settings, self.dtype)
        self.model.to(self.device).eval()
        self.max_length = _effective_max_length(settings.max_length, self.tokenizer, self.model)
        self.max_batch_tokens = settings.max_batch_tokens or default_batch_tokens(self.device)
        self._uses_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._tokenizer_lock = threading.Lock()
        logger.info(
            "loaded %s on %s (%s), max_length=%d", self.name, self.device, self.dtype, self.max_length
        )

    @property
    def name(self) -> str:
        """The model id or path it was loaded from."""
        return self.settings.model

    def tokenize(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        max_length: int | None = None,
        truncation_side: TruncationSide = "right",
        max_passage_tokens: int | None = None,
    ) -> EncodedPairs:
        """Tokenize pairs, truncating the longer side first (at its end, or start if "left").

        Args:
            queries: Query of each pair.
            passages: Passage of each pair.
            max_length: Tokens per pair, at most the model's ``max_length``.
            truncation_side: Which end of a text truncation cuts.
            max_passage_tokens: Cut each passage to this many of its own tokens first (Cohere's
                ``max_tokens_per_doc``), from the same side.
        """
        limit = min(max_length or self.max_length, self.max_length)
        with self._tokenizer_lock:
            default_side = self.tokenizer.truncation_side
            self.tokenizer.truncation_side = truncation_side
            try:
                if max_passage_tokens is not None:
                    passages = self._cut_passages(passages, max_passage_tokens)
                encoding = self.tokenizer(
                    list(queries), list(passages), truncation="longest_first", max_length=limit
                )
            finally:
                self.tokenizer.truncation_side = default_side
        input_ids = encoding["input_ids"]
        lengths = np.fromiter((len(ids) for ids in input_ids), dtype=np.int64, count=len(input_ids))
        if encoding.encodings is not None:
            truncated = np.array([len(enc.overflowing) > 0 for enc in encoding.encodings], dtype=bool)
        else:  # slow tokenizer: a pair that fills the limit exactly is counted as truncated
            truncated = lengths >= limit
        token_types = encoding.get("token_type_ids") if self._uses_token_types else None
        return EncodedPairs(input_ids, token_types, lengths, truncated)

    def _cut_passages(self, passages: Sequence[str], max_tokens: int) -> list[str]:
        """Each passage cut to at most ``max_tokens`` of its own tokens, from the tokenizer's side.

        The cut falls between whole words (a word split across the limit is left out), so the text
        re-tokenizes to exactly the kept tokens.
        """
        if not self.tokenizer.is_fast:  # no offsets: rebuild the text from the kept tokens
            ids = self.tokenizer(
                list(passages), add_special_tokens=False, truncation=True, max_length=max_tokens
            )
            return self.tokenizer.batch_decode(ids["input_ids"])
        encoding = self.tokenizer(
            list(passages),
            add_special_tokens=False,
            truncation=True,
            max_length=max_tokens + 1,  # one more token tells whether the limit splits a word
            return_offsets_mapping=True,
        )
        from_left = self.tokenizer.truncation_side == "left"
        cut = []
        for index, text in enumerate(passages):
            offsets, words = encoding["offset_mapping"][index], encoding.word_ids(index)
            if len(offsets) <= max_tokens:
                cut.append(text)
                continue
            kept = _whole_word_window(words, max_tokens, from_left)
            cut.append(text[offsets[kept.start][0] : offsets[kept.stop - 1][1]] if kept else "")
        return cut

    @torch.inference_mode()
    def forward(self, encoded: EncodedPairs, batch: np.ndarray) -> np.ndarray:
        """Run one padded batch and return its relevance logits as float32."""
        lengths = encoded.lengths[batch]
        input_ids = pad_rows([encoded.input_ids[i] for i in batch], lengths, self._pad_id)
        inputs = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(
                (np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64)
            ),
        }
        if encoded.token_type_ids is not None:
            token_types = [encoded.token_type_ids[i] for i in batch]
            inputs["token_type_ids"] = torch.from_numpy(pad_rows(token_types, lengths, 0))
        logits = self.model(**{key: value.to(self.device) for key, value in inputs.items()}).logits
        return _relevance_logit(logits).float().cpu().numpy()

    def score(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        max_length: int | None = None,
        truncation_side: TruncationSide = "right",
        activation: Activation | None = None,
    ) -> ScoreResult:
        """Score pairs ``(queries[i], passages[i])``; scores come back float32 in input order.

        ``activation`` defaults to the setting; raw logits ("none") or "sigmoid".
        """
        if len(queries) != len(passages):
            raise ValueError("queries and passages must have the same length")
        if not len(queries):
            return ScoreResult(np.empty(0, dtype=np.float32), 0, 0)
        encoded = self.tokenize(queries, passages, max_length, truncation_side)
        return ScoreResult(
            self.score_encoded(encoded, activation=activation),
            int(encoded.lengths.sum()),
            int(encoded.truncated.sum()),
        )

    def score_encoded(
        self, encoded: EncodedPairs, max_batch_pairs: int | None = None, activation: Activation | None = None
    ) -> np.ndarray:
        """Score already tokenized pairs in length-aware batches; float32 in input order.

        ``max_batch_pairs`` and ``activation`` default to the settings.
        """
        scores = np.empty(len(encoded.lengths), dtype=np.float32)
        pairs_cap = max_batch_pairs or self.settings.max_batch_pairs
        for batch in plan_batches(encoded.lengths, self.max_batch_tokens, pairs_cap):
            scores[batch] = self.forward(encoded, batch)
        return sigmoid(scores) if (activation or self.settings.activation) == "sigmoid" else scores

    def predict(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Score ``(query, passage)`` pairs, like ``CrossEncoder.predict``."""
        return self.score([pair[0] for pair in pairs], [pair[1] for pair in pairs]).scores

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
    ) -> list[dict[str, Any]]:
        """Rank documents for one query, like ``CrossEncoder.rank``.

        Returns:
            Dicts with ``corpus_id`` and ``score`` (and ``text`` if asked), best first.

        """
        scores = self.score([query] * len(documents), documents).scores
        order = np.argsort(-scores, kind="stable")[:top_k]
        results: list[dict[str, Any]] = []
        for index in order:
            result: dict[str, Any] = {"corpus_id": int(index), "score": float(scores[index])}
            if return_documents:
                result["text"] = documents[index]
            results.append(result)
        return results


def _whole_word_window(words: list[int | None], size: int, from_left: bool) -> range:
    """Token positions of the ``size`` tokens kept at one end, less a word the limit cuts through.

    ``words`` holds ``size + 1`` word ids: the kept tokens plus the first one dropped.
    """
    kept = range(1, size + 1) if from_left else range(size)
    dropped = 0 if from_left else size
    boundary = kept.start if from_left else kept.stop - 1
    if words[dropped] is None or words[dropped] != words[boundary]:
        return kept
    split_word = words[boundary]
    positions = [i for i in kept if words[i] != split_word]
    return range(positions[0], positions[-1] + 1) if positions else range(0)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable float32 sigmoid."""
    values = np.asarray(logits, dtype=np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * values))).astype(np.float32)


def _relevance_logit(logits: torch.Tensor) -> torch.Tensor:
    """One relevance logit per pair: the single logit, or log-odds of label 1 for 2-label heads."""
    if logits.shape[-1] == 1:
        return logits[:, 0]
    return logits[:, 1] - logits[:, 0]


def _effective_max_length(requested: int, tokenizer: PreTrainedTokenizerBase, model: Any) -> int:
    limits = [requested, getattr(model.config, "max_position_embeddings", requested)]
    if isinstance(tokenizer.model_max_length, int) and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    return min(limits)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_loadable(settings: ModelSettings) -> None:
    """Fail fast, e.g. on a job's driver before any worker starts, if the model can't be loaded.

    Reads the config and the tokenizer (small files) and checks that a local directory holds weights
    and that the head has 1 or 2 labels; the weights themselves are left to the workers.

    Raises:
        ModelLoadError: Unknown id, no network, a directory without weights, or not a reranker head.
    """
    options: dict[str, Any] = {"revision": settings.revision, "trust_remote_code": settings.trust_remote_code}
    try:
        with _hub_warnings_silenced():  # the one error below says it all, not a warning per retry
            config = AutoConfig.from_pretrained(settings.model, **options)
            AutoTokenizer.from_pretrained(settings.model, **options)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_load_failure_message(settings.model, exc)) from exc
    local = Path(settings.model)
    if local.is_dir() and not any((local / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"cannot load model {settings.model!r}: the directory has no weights "
            f"({', '.join(WEIGHT_FILES[::2])})"
        )
    _check_labels(settings.model, config.num_labels)


@contextlib.contextmanager
def _hub_warnings_silenced() -> Iterator[None]:
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _check_labels(model: str, num_labels: int) -> None:
    if num_labels not in (1, 2):
        raise ModelLoadError(f"model {model!r} has {num_labels} labels; a reranker needs 1 (or 2)")


def _load(settings: ModelSettings, dtype: torch.dtype) -> tuple[PreTrainedTokenizerBase, Any]:
    options: dict[str, Any] = {
        "revision": settings.revision,
        "trust_remote_code": settings.trust_remote_code,
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model, **options)
        model = AutoModelForSequenceClassification.from_pretrained(settings.model, dtype=dtype, **options)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_load_failure_message(settings.model, exc)) from exc
    _check_labels(settings.model, model.config.num_labels)
    return tokenizer, model


def _load_failure_message(model: str, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    return (
        f"cannot load model {model!r}: {reason}. "
        "If this machine has no network access, download the model where there is one "
        f"(huggingface-cli download {model} --local-dir DIR), copy DIR here, and pass "
        "--model DIR (or RERANK_MODEL=DIR)."
    )
