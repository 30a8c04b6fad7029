"""The cross-encoder used unchanged by the offline job and the online service.

Pipeline per call: tokenize all pairs once (truncating to ``max_length``) -> plan length-aware
batches -> forward each batch -> post-process (relevance logit, the call's activation) -> input order.
Only this class touches the tokenizer and the weights; every per-call option is an argument, so
concurrent callers (the requests of a service) never change each other's results.

One class, two families behind it (``reranker.families``): plain sequence classifiers tokenized by
``PairTokenizer`` and run by the Hugging Face model (BERT: the exact [CLS]-only last layer), and what
sentence-transformers defines beyond them (LLM yes/no rerankers, templated classifiers, module chains),
prepared and run by its ``CrossEncoder`` (``reranker.st_backend``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self, overload

import numpy as np
import pydantic
import torch
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedTokenizerBase,
)

from reranker.batching import attention_mask, pad_batch, plan_batches
from reranker.chunking import Chunked, best_of, split_long
from reranker.cls_forward import build_cls_forward
from reranker.errors import ConfigError, ModelLoadError
from reranker.families import SEQUENCE_CLASSIFICATION, model_family
from reranker.loading import check_labels, hub_options, load_failure_message, untrained_weights_message
from reranker.scores import sigmoid
from reranker.settings import DEFAULT_MODEL, ModelOptions, describe_validation_error
from reranker.tokenizer import EncodedPairs, PairEncoder, PairTokenizer, cut_pairs
from reranker.types import Activation, Precision, TruncationSide

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CPU_BATCH_TOKENS = 4096  # measured: 4096 beats 2048 by 4-13% on TinyBERT-L2 (rescore_bench notes)
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
class ScoreResult:
    """Scores in input order plus what it took to compute them."""

    scores: np.ndarray
    num_tokens: int
    num_truncated: int


class CrossEncoderModel:
    """A Hugging Face cross-encoder that scores (query, passage) pairs in length-aware batches."""

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        *,
        revision: str | None = None,
        device: str = "auto",
        precision: Precision = "fp32",
        max_length: int = 512,
        activation: Activation = "none",
        max_batch_tokens: int | None = None,
        max_batch_pairs: int = 1024,
        torch_threads: int | None = None,
        cls_only_last_layer: bool = True,
        trust_remote_code: bool = False,
        instruction: str | None = None,
        true_token: str | None = None,
        false_token: str | None = None,
        max_chunks_per_doc: int = 1,
        chunk_overlap_tokens: int = 32,
    ) -> None:
        """Load the tokenizer and the weights once; every option is fixed from here on.

        Reads no environment variable (programs build the class from their settings with
        ``from_settings``) and changes torch's process-wide thread count only when
        ``torch_threads`` is given.

        Args:
            model_name_or_path: Hugging Face hub id or local directory of a sequence-classification
                cross-encoder with 1 (or 2) labels.
            revision: Hub branch, tag or commit to load.
            device: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
            precision: "fp32", "bf16", or "fp16" (GPU only).
            max_length: Tokens per pair, capped by the model.
            activation: Default scores: raw logits ("none") or "sigmoid"; a call may pick another.
            max_batch_tokens: Padded tokens per forward pass (default: 4,096 on CPU, 65,536 on GPU).
            max_batch_pairs: Pairs per forward pass at most.
            torch_threads: Set torch's intra-op threads (process-wide) to this.
            cls_only_last_layer: Run the last layer at [CLS] only (exact; BERT-family models).
            trust_remote_code: Allow custom model code from the hub.
            instruction: The task description for a model that takes one (an LLM reranker's system
                prompt); a call may pass another. Default: the model's own.
            true_token: LLM rerankers: the token whose logit means relevant (default: the model's).
            false_token: LLM rerankers: the token whose logit means irrelevant (default: the model's).
            max_chunks_per_doc: A passage longer than a pair holds: 1 cuts it to fit; N scores up to N
                overlapping windows of it and keeps the best (``reranker.chunking``); a call may pass another.
            chunk_overlap_tokens: Tokens each window shares with the previous one.

        Raises:
            ModelLoadError: The model can't be found or read, or has no trained reranker head.
            ConfigError: An invalid option (device, precision, a value out of range).
        """
        try:
            settings = ModelOptions(
                model=model_name_or_path,
                revision=revision,
                device=device,
                precision=precision,
                max_length=max_length,
                activation=activation,
                max_batch_tokens=max_batch_tokens,
                max_batch_pairs=max_batch_pairs,
                torch_threads=torch_threads,
                cls_only_last_layer=cls_only_last_layer,
                trust_remote_code=trust_remote_code,
                instruction=instruction,
                true_token=true_token,
                false_token=false_token,
                max_chunks_per_doc=max_chunks_per_doc,
                chunk_overlap_tokens=chunk_overlap_tokens,
            )
        except pydantic.ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None
        self._load(settings)

    @classmethod
    def from_settings(cls, options: ModelOptions) -> Self:
        """The model a program's settings describe (``ModelSettings`` is a ``ModelOptions``)."""
        return cls(options.model, **options.model_dump(exclude={"model"}))

    def _load(self, settings: ModelOptions) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.precision, self.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.family = model_family(settings)
        if self.family == SEQUENCE_CLASSIFICATION:
            self._load_classifier(settings)
        else:
            self._load_sentence_transformers(settings)
        self._pad_left = self.pair_tokenizer.padding_side == "left"
        self.max_length = self.pair_tokenizer.max_length
        self.max_batch_tokens = settings.max_batch_tokens or default_batch_tokens(self.device)
        self._pin_memory = self.device.type == "cuda"
        logger.info(
            "loaded %s on %s (%s), max_length=%d", self.name, self.device, self.dtype, self.max_length
        )

    def _load_classifier(self, settings: ModelOptions) -> None:
        """A plain sequence classifier: the Hugging Face model and ``PairTokenizer``."""
        self.model = _load_weights(settings, self.dtype)
        self.model.to(self.device).eval()
        self._logits = self._pick_forward(settings)
        self.pair_tokenizer: PairEncoder = PairTokenizer(settings, self.model.config)
        self.kind = "sequence-classification"

    def _load_sentence_transformers(self, settings: ModelOptions) -> None:
        """What sentence-transformers defines: its ``CrossEncoder``, its preparation, its modules."""
        from reranker.st_backend import (
            SentenceTransformersScorer,
            TemplatePairEncoder,
            load_cross_encoder,
            model_kind,
        )

        self.model = load_cross_encoder(settings, str(self.device), self.dtype)
        encoder = TemplatePairEncoder(self.model, settings)
        self.pair_tokenizer = encoder
        self._logits = SentenceTransformersScorer(self.model, encoder)
        self.kind = model_kind(self.model)

    @property
    def name(self) -> str:
        """The model id or path it was loaded from."""
        return self.settings.model

    @property
    def takes_instruction(self) -> bool:
        """Whether an instruction changes what the model scores (an LLM reranker's prompt)."""
        return self.pair_tokenizer.takes_instruction

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The Hugging Face tokenizer (owned by ``pair_tokenizer``)."""
        return self.pair_tokenizer.tokenizer

    def tokenize(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        max_length: int | None = None,
        truncation_side: TruncationSide = "right",
        max_passage_tokens: int | None = None,
        instruction: str | None = None,
        max_query_tokens: int | None = None,
    ) -> EncodedPairs:
        """Tokenize pairs; see ``PairTokenizer.tokenize`` (``instruction``: default, the model's)."""
        return self.pair_tokenizer.tokenize(
            queries,
            passages,
            max_length,
            truncation_side,
            max_passage_tokens,
            instruction if instruction is not None else self.settings.instruction,
            max_query_tokens,
        )

    @torch.inference_mode()
    def forward(self, encoded: EncodedPairs, batch: np.ndarray) -> np.ndarray:
        """Run one padded batch and return its relevance logits as float32."""
        left = self._pad_left
        input_ids = pad_batch(encoded.input_ids, encoded.offsets, batch, self.pair_tokenizer.pad_id, left)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask(encoded.lengths[batch], left)}
        if encoded.token_type_ids is not None:
            inputs["token_type_ids"] = pad_batch(encoded.token_type_ids, encoded.offsets, batch, 0, left)
        logits = self._logits(**{key: self._to_device(value) for key, value in inputs.items()})
        return _relevance_logit(logits).float().cpu().numpy()

    def _pick_forward(self, settings: ModelOptions) -> Callable[..., torch.Tensor]:
        """The [CLS]-only forward where it applies and checks out, else the Hugging Face one."""
        fast = build_cls_forward(self.model, self.dtype) if settings.cls_only_last_layer else None
        logger.info("forward: %s", "last layer at [CLS] only" if fast else "full (Hugging Face)")
        return fast or (lambda **inputs: self.model(**inputs).logits)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """Host array to a tensor on the model's device; through pinned memory on CUDA (async copy)."""
        tensor = torch.from_numpy(array)
        if self._pin_memory:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def score(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        max_length: int | None = None,
        truncation_side: TruncationSide = "right",
        activation: Activation | None = None,
        max_batch_pairs: int | None = None,
        instruction: str | None = None,
        max_chunks_per_doc: int | None = None,
    ) -> ScoreResult:
        """Score pairs ``(queries[i], passages[i])``; scores come back float32 in input order.

        ``activation`` (raw logits "none", or "sigmoid"), ``max_batch_pairs``, ``instruction`` and
        ``max_chunks_per_doc`` (over 1: a long passage scores as its best window) default to the model's;
        they apply to this call alone.
        """
        if len(queries) != len(passages):
            raise ValueError("queries and passages must have the same length")
        if not len(queries):
            return ScoreResult(np.empty(0, dtype=np.float32), 0, 0)
        chunks = max_chunks_per_doc or self.settings.max_chunks_per_doc
        split = None
        if chunks > 1:
            split = self.split_long(queries, passages, chunks, instruction, max_length=max_length)
            queries, passages = split.queries, split.passages
        encoded = self.tokenize(queries, passages, max_length, truncation_side, instruction=instruction)
        scores = self.score_encoded(encoded, max_batch_pairs=max_batch_pairs, activation=activation)
        truncated = encoded.truncated
        if split is not None:
            scores, truncated = best_of(scores, split.owner), split.truncated(truncated)
        return ScoreResult(scores, int(encoded.lengths.sum()), int(truncated.sum()))

    def split_long(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        max_chunks: int,
        instruction: str | None = None,
        max_passage_tokens: int | None = None,
        max_query_tokens: int | None = None,
        max_length: int | None = None,
    ) -> Chunked:
        """Pairs whose passage does not fit split into overlapping windows (``reranker.chunking``).

        The caps apply first (a passage cut to ``max_passage_tokens`` is what is split); windows fill
        ``max_length`` (default: the model's) tokens. Not for concurrent threads: the tokenizer is shared.
        """
        prompt = instruction if instruction is not None else self.settings.instruction
        overlap = self.settings.chunk_overlap_tokens
        if max_passage_tokens is not None or max_query_tokens is not None:
            queries, passages = cut_pairs(
                self.tokenizer, queries, passages, max_query_tokens, max_passage_tokens, self.max_length
            )
        return split_long(self.pair_tokenizer, queries, passages, max_chunks, overlap, prompt, max_length)

    def score_encoded(
        self, encoded: EncodedPairs, max_batch_pairs: int | None = None, activation: Activation | None = None
    ) -> np.ndarray:
        """Score already tokenized pairs in length-aware batches; float32 in input order.

        ``max_batch_pairs`` and ``activation`` default to the model's.
        """
        scores = np.empty(len(encoded.lengths), dtype=np.float32)
        pairs_cap = max_batch_pairs or self.settings.max_batch_pairs
        for batch in plan_batches(encoded.lengths, self.max_batch_tokens, pairs_cap):
            scores[batch] = self.forward(encoded, batch)
        if (activation or self.settings.activation) == "sigmoid":
            return sigmoid(scores).astype(np.float32)
        return scores

    @overload
    def predict(
        self,
        inputs: tuple[str, str],
        batch_size: int | None = None,
        activation: Activation | None = None,
        instruction: str | None = None,
    ) -> np.float32: ...

    @overload
    def predict(
        self,
        inputs: Sequence[tuple[str, str]],
        batch_size: int | None = None,
        activation: Activation | None = None,
        instruction: str | None = None,
    ) -> np.ndarray: ...

    def predict(
        self,
        inputs: tuple[str, str] | Sequence[tuple[str, str]],
        batch_size: int | None = None,
        activation: Activation | None = None,
        instruction: str | None = None,
    ) -> np.ndarray | np.float32:
        """Score ``(query, passage)`` pairs, like ``CrossEncoder.predict``.

        Args:
            inputs: A list of pairs, or one pair.
            batch_size: Pairs per forward pass at most (batches are also cut by ``max_batch_tokens``).
            activation: "none" (raw logits) or "sigmoid"; default: the model's.
            instruction: The task description for a model that takes one (``CrossEncoder``'s
                ``prompt``); default: the model's.

        Returns:
            float32 scores in input order; a single float32 for a single pair.
        """
        single = _is_pair(inputs)
        pairs: Sequence[tuple[str, str]] = [inputs] if single else inputs  # type: ignore[list-item,assignment]
        queries, passages = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        scores = self.score(
            queries, passages, activation=activation, max_batch_pairs=batch_size, instruction=instruction
        ).scores
        return scores[0] if single else scores

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int | None = None,
        activation: Activation | None = None,
        instruction: str | None = None,
    ) -> list[dict[str, Any]]:
        """Rank documents for one query, like ``CrossEncoder.rank``; ties keep document order.

        Returns:
            Dicts with ``corpus_id`` and ``score`` (and ``text`` if asked), best first, ``top_k`` of them.
        """
        pairs = [(query, document) for document in documents]
        scores = self.predict(pairs, batch_size, activation, instruction)
        order = np.argsort(-scores, kind="stable")[:top_k]
        results: list[dict[str, Any]] = []
        for index in order:
            result: dict[str, Any] = {"corpus_id": int(index), "score": float(scores[index])}
            if return_documents:
                result["text"] = documents[index]
            results.append(result)
        return results


def _is_pair(inputs: Any) -> bool:
    """One ``(query, passage)`` pair rather than a list of them."""
    return len(inputs) == 2 and all(isinstance(part, str) for part in inputs)


def _relevance_logit(logits: torch.Tensor) -> torch.Tensor:
    """One relevance logit per pair: the single logit, or log-odds of label 1 for 2-label heads."""
    if logits.shape[-1] == 1:
        return logits[:, 0]
    return logits[:, 1] - logits[:, 0]


def _load_weights(settings: ModelOptions, dtype: torch.dtype) -> Any:
    """The weights, refusing a checkpoint that lacks any of them (transformers would fill in random ones)."""
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            settings.model, dtype=dtype, output_loading_info=True, **hub_options(settings)
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(load_failure_message(settings.model, exc)) from exc
    check_labels(settings.model, model.config.num_labels)
    if info["missing_keys"]:
        raise ModelLoadError(untrained_weights_message(settings.model, set(info["missing_keys"])))
    return model
