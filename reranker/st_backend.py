"""The sentence-transformers family: pairs prepared and scored exactly as its ``CrossEncoder`` does.

sentence-transformers defines these rerankers (``reranker.families``): the module chain in
``modules.json`` (or, for a causal LM without one, Transformer + LogitScore on ``yes`` / ``no``), the
chat template that wraps query, document and instruction (``prompt``: a system message), left padding
and last-token logits for causal LMs, and its ``preprocess`` (truncation that keeps the template's
suffix). Nothing of that is re-derived here:

- the CPU half, ``TemplatePairEncoder``, calls the ``CrossEncoder``'s own ``preprocess`` and keeps each
  pair's real tokens; a tokenization task builds that ``CrossEncoder`` without weights
  (``weightless``), so it needs only the config and the tokenizer;
- the forward half, ``SentenceTransformersScorer``, pads our length-sorted, token-budget batches on the
  tokenizer's side and runs the ``CrossEncoder``'s modules on them; its ``scores`` are the raw logits
  (LogitScore's log-odds, or the classifier's logit).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from reranker.errors import ConfigError, ModelLoadError
from reranker.loading import hub_options, load_failure_message
from reranker.settings import ModelOptions
from reranker.tokenizer import EncodedPairs, cut_pairs
from reranker.types import TruncationSide

_LOAD_LOCK = threading.Lock()  # weightless loading patches sentence-transformers' model loader
_CHUNK_PAIRS = 1024  # pairs prepared at once (a padded batch each)
_PROBE = [("query text", "document text")]


@contextlib.contextmanager
def weightless() -> Iterator[None]:
    """Build sentence-transformers' Transformer modules on the meta device: config and tokenizer only.

    ``Transformer._load_model`` is the one loader of its weights; within this block it builds the same
    architecture from the config without reading the checkpoint (a tokenization task of an 8B reranker
    must not load 16 GB to tokenize).
    """
    from sentence_transformers.base.modules import transformer

    with _LOAD_LOCK:
        original = transformer.Transformer._load_model

        def meta_model(self: Any, name: str, task: str, config: Any, *args: Any, **kwargs: Any) -> Any:
            with torch.device("meta"):
                return transformer.TRANSFORMER_TASK_TO_AUTO_MODEL[task].from_config(config)  # type: ignore[index]

        transformer.Transformer._load_model = meta_model
        try:
            yield
        finally:
            transformer.Transformer._load_model = original


def load_cross_encoder(
    settings: ModelOptions, device: str = "cpu", dtype: torch.dtype = torch.float32, weights: bool = True
) -> Any:
    """The checkpoint as sentence-transformers' ``CrossEncoder`` (``weights=False``: on the meta device).

    Raises:
        ModelLoadError: It can't be loaded, or sentence-transformers refuses it (e.g. a causal LM
            whose tokenizer has no ``yes`` / ``no`` tokens and none are configured).
    """
    from sentence_transformers import CrossEncoder

    options = hub_options(settings)
    model_kwargs = {"dtype": dtype}
    try:
        with weightless() if not weights else contextlib.nullcontext():
            modules = _configured_modules(settings, model_kwargs)
            model = CrossEncoder(
                None if modules else settings.model,
                modules=modules,
                device="meta" if not weights else device,
                model_kwargs=model_kwargs,
                **({} if modules else options),
            )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(load_failure_message(settings.model, exc)) from exc
    _set_score_tokens(model, settings)
    model.max_seq_length = min(settings.max_length, model.max_seq_length or settings.max_length)
    model.eval()
    return model


def _configured_modules(settings: ModelOptions, model_kwargs: dict[str, Any]) -> list[Any] | None:
    """A causal LM's default chain with the configured true/false tokens, or None for the model's own.

    sentence-transformers builds the default chain only with ``yes`` / ``no``; a model that needs
    others (and has no ``modules.json`` of its own) gets its Transformer and a LogitScore on them.
    """
    from reranker.loading import model_file

    if settings.true_token is None or model_file(settings, "modules.json") is not None:
        return None
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules import LogitScore

    kwargs = {**hub_options(settings)}
    transformer = Transformer(
        settings.model,
        transformer_task="text-generation",
        model_kwargs={**kwargs, **model_kwargs},
        processor_kwargs=kwargs,
        config_kwargs=kwargs,
    )
    true_id, false_id = _token_ids(transformer.tokenizer, settings)
    return [transformer, LogitScore(true_token_id=true_id, false_token_id=false_id)]


def _set_score_tokens(model: Any, settings: ModelOptions) -> None:
    """Point the model's LogitScore at the configured true/false tokens (refused without one)."""
    if settings.true_token is None and settings.false_token is None:
        return
    from sentence_transformers.cross_encoder.modules import LogitScore

    scorers = [module for module in model if isinstance(module, LogitScore)]
    if not scorers:
        raise ConfigError(
            f"true_token / false_token: model {settings.model!r} reads no token logits (not an LLM reranker)"
        )
    true_id, false_id = _token_ids(model.tokenizer, settings)
    scorers[-1].true_token_id = true_id if settings.true_token is not None else scorers[-1].true_token_id
    scorers[-1].false_token_id = false_id if settings.false_token is not None else scorers[-1].false_token_id


def _token_ids(tokenizer: Any, settings: ModelOptions) -> tuple[int, int | None]:
    """The vocabulary ids of the configured true/false tokens (false optional).

    Raises:
        ConfigError: A token is not one token of the vocabulary.
    """
    vocabulary = tokenizer.get_vocab()
    ids = []
    for name, token in (("true_token", settings.true_token or "yes"), ("false_token", settings.false_token)):
        if token is not None and token not in vocabulary:
            raise ConfigError(f"{name}: {token!r} is not a token of model {settings.model!r}'s vocabulary")
        ids.append(None if token is None else int(vocabulary[token]))
    return int(ids[0]), ids[1]  # type: ignore[arg-type]


class TemplatePairEncoder:
    """Pairs to token ids as the ``CrossEncoder`` prepares them: its template, prompt and truncation.

    Thread-safe: per-call truncation settings are applied under a lock.
    """

    def __init__(self, cross_encoder: Any, settings: ModelOptions) -> None:
        """Probe the model's preparation once (features, padding side, whether a prompt changes it).

        Raises:
            ModelLoadError: The model cannot prepare a pair (e.g. its chat template has no query and
                document roles, or a causal LM has no chat template: not a reranker).
        """
        self.cross_encoder, self.settings = cross_encoder, settings
        self.tokenizer = cross_encoder.tokenizer
        self.max_length = int(cross_encoder.max_seq_length or settings.max_length)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.padding_side: str = self.tokenizer.padding_side
        self._lock = threading.Lock()
        self._check_reranker()
        probe = self._prepare(_PROBE, None)
        self.uses_token_types = "token_type_ids" in probe
        self.static_features = {key: value for key, value in probe.items() if not torch.is_tensor(value)}
        self.default_instruction = self._default_prompt()
        self.takes_instruction = bool(
            torch.is_tensor(probe["input_ids"])
            and not torch.equal(self._prepare(_PROBE, "an instruction")["input_ids"], probe["input_ids"])
            and "message" in self.modalities
        )

    @property
    def modalities(self) -> list[str]:
        """The input kinds the model's first module takes (``message``: through its chat template)."""
        return list(getattr(self.cross_encoder[0], "modality_config", {"text": {}}).keys())

    def _check_reranker(self) -> None:
        """Refuse a causal LM without a chat template: nothing tells it what to judge."""
        task = getattr(self.cross_encoder[0], "transformer_task", None)
        if task == "text-generation" and "message" not in self.modalities:
            raise ModelLoadError(
                f"model {self.settings.model!r} is a causal LM without a chat template: not a reranker "
                "(an LLM reranker ships the template that asks it to judge a query and a document)"
            )

    def _default_prompt(self) -> str | None:
        name = getattr(self.cross_encoder, "default_prompt_name", None)
        return (getattr(self.cross_encoder, "prompts", None) or {}).get(name) if name else None

    def _prepare(self, pairs: Sequence[tuple[str, str]], prompt: str | None) -> dict[str, Any]:
        try:
            return dict(self.cross_encoder.preprocess(list(pairs), prompt=prompt))
        except ValueError as exc:
            reason = str(exc).strip().splitlines()[0]
            message = f"model {self.settings.model!r} cannot prepare a query-document pair: {reason}"
            raise ModelLoadError(message) from None

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
        """Each pair's token ids as the model prepares it (padding dropped), as ``PairTokenizer.tokenize``.

        ``instruction`` (the model's default when None) reaches a model that takes one as its prompt.
        A pair that reaches the token limit counts as truncated.

        Raises:
            ConfigError: An instruction for a model that takes none.
        """
        if instruction is not None and not self.takes_instruction:
            raise ConfigError(
                f"instruction: model {self.settings.model!r} takes none (its input has no prompt)"
            )
        limit = min(max_length or self.max_length, self.max_length)
        prompt = instruction if instruction is not None else self.default_instruction
        with self._lock, self._truncating(truncation_side, limit):
            queries, passages = cut_pairs(
                self.tokenizer, queries, passages, max_query_tokens, max_passage_tokens, limit
            )
            pairs = list(zip(queries, passages, strict=True))
            chunks = [
                self._flat(self._prepare(pairs[i : i + _CHUNK_PAIRS], prompt))
                for i in range(0, len(pairs), _CHUNK_PAIRS)
            ]
        return _join(chunks, self.uses_token_types, limit)

    @contextlib.contextmanager
    def _truncating(self, side: TruncationSide, limit: int) -> Iterator[None]:
        """Truncation side and token limit for one call, restored after it."""
        saved = (self.tokenizer.truncation_side, self.cross_encoder.max_seq_length)
        self.tokenizer.truncation_side = side
        self.cross_encoder.max_seq_length = limit
        try:
            yield
        finally:
            self.tokenizer.truncation_side, self.cross_encoder.max_seq_length = saved

    def _flat(self, features: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Each row's real tokens (where the attention mask is 1), and its token types if any."""
        mask = features["attention_mask"].bool().numpy()
        ids = [row[keep] for row, keep in zip(features["input_ids"].numpy(), mask, strict=True)]
        if "token_type_ids" not in features:
            return ids, None
        types = [row[keep] for row, keep in zip(features["token_type_ids"].numpy(), mask, strict=True)]
        return ids, types


def _join(
    chunks: list[tuple[list[np.ndarray], list[np.ndarray] | None]], with_types: bool, limit: int
) -> EncodedPairs:
    rows = [row for ids, _ in chunks for row in ids]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    empty = np.empty(0, np.int32)
    values = np.concatenate([empty, *rows]).astype(np.int32)
    types = None
    if with_types:
        types = np.concatenate([empty, *itertools.chain.from_iterable(t or [] for _, t in chunks)])
        types = types.astype(np.int32)
    return EncodedPairs(values, offsets, types, lengths >= limit)


class SentenceTransformersScorer:
    """The ``CrossEncoder``'s modules on our batches: raw relevance logits, one per pair."""

    def __init__(self, cross_encoder: Any, encoder: TemplatePairEncoder) -> None:
        self.cross_encoder = cross_encoder
        self.static_features = dict(encoder.static_features)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, labels)`` for padded ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``)."""
        scores = self.cross_encoder({**inputs, **self.static_features})["scores"]
        return scores if scores.dim() == 2 else scores.unsqueeze(-1)


def model_kind(cross_encoder: Any) -> str:
    """What the service reports: ``llm-yes-no`` (LogitScore on token logits) or ``sentence-transformers``."""
    from sentence_transformers.cross_encoder.modules import LogitScore

    return (
        "llm-yes-no"
        if any(isinstance(module, LogitScore) for module in cross_encoder)
        else "sentence-transformers"
    )
