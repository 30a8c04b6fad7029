"""The model's tokenizer alone, without the weights: what a CPU tokenization stage loads.

``reranker.model`` adds the weights; ``reranker.loading`` checks a model before anything loads.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from reranker.errors import ConfigError, ModelLoadError
from reranker.loading import hub_options, load_failure_message
from reranker.settings import ModelOptions
from reranker.types import TruncationSide

PreTrainedTokenizerBase = Any  # transformers' tokenizer; not imported here (the module stays light)

logger = logging.getLogger(__name__)

_CHUNK_PAIRS = 4096  # tokenizer output held at once: ~60 MB of per-pair objects, not ~15 KB x every pair


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of tokenized (query, passage) pairs, unpadded and flat.

    Pair ``i`` has tokens ``input_ids[offsets[i]:offsets[i + 1]]``; flat arrays move between
    processes (a tokenization stage and a scoring actor) without per-pair Python objects.
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    token_type_ids: np.ndarray | None
    truncated: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Tokens in each pair."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pair_ids(self) -> list[list[int]]:
        """Each pair's token ids as lists (for inspection and tests)."""
        return [self.input_ids[a:b].tolist() for a, b in itertools.pairwise(self.offsets)]


class PairEncoder(Protocol):
    """The CPU half of a model family: (query, passage) pairs to token ids, with no weights loaded.

    ``PairTokenizer`` (plain sequence classifiers) and ``reranker.st_backend.TemplatePairEncoder``
    (what sentence-transformers defines) implement it; ``reranker.encoders.pair_encoder`` picks one.
    """

    max_length: int
    pad_id: int
    padding_side: str
    takes_instruction: bool

    @property
    def tokenizer(self) -> Any: ...  # noqa: D102

    def tokenize(  # noqa: D102
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        max_length: int | None = None,
        truncation_side: TruncationSide = "right",
        max_passage_tokens: int | None = None,
        instruction: str | None = None,
        max_query_tokens: int | None = None,
    ) -> EncodedPairs: ...


class PairTokenizer:
    """The model's tokenizer alone: what a CPU tokenization stage loads (no weights).

    Thread-safe: per-call truncation settings are applied under a lock.
    """

    padding_side = "right"
    takes_instruction = False  # a plain text-pair classifier has no prompt to put one in

    def __init__(self, settings: ModelOptions, config: Any | None = None) -> None:
        """Load the tokenizer (and the model config when not given, for its position limit).

        Raises:
            ModelLoadError: The tokenizer or config can't be found or read.

        """
        from transformers import AutoConfig, AutoTokenizer  # here: importing the module stays torch-free

        options = hub_options(settings)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model, **options)
            config = config or AutoConfig.from_pretrained(settings.model, **options)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(load_failure_message(settings.model, exc)) from exc
        self.max_length = _effective_max_length(settings.max_length, self.tokenizer, config)
        self.uses_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self.pad_id = self.tokenizer.pad_token_id or 0
        self._lock = threading.Lock()
        self._backend = self._checked_backend()

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
        """Tokenize pairs, truncating the longer side first (at its end, or start if "left").

        Args:
            queries: Query of each pair.
            passages: Passage of each pair.
            max_length: Tokens per pair, at most the model's ``max_length``.
            truncation_side: Which end of a text truncation cuts.
            max_passage_tokens: Cut each passage to this many of its own tokens first (Cohere's
                ``max_tokens_per_doc``), from the same side.
            instruction: Refused: this family has no prompt (``takes_instruction`` is False).
            max_query_tokens: Cut each query to this many of its own tokens first (vLLM's
                ``max_tokens_per_query``), from the same side.

        Raises:
            ConfigError: An instruction was given.
        """
        if instruction is not None:
            raise ConfigError("instruction: this model takes none (a sequence classifier of text pairs)")
        limit = min(max_length or self.max_length, self.max_length)
        with self._lock:
            default_side = self.tokenizer.truncation_side
            self.tokenizer.truncation_side = truncation_side
            try:
                queries, passages = cut_pairs(self.tokenizer, queries, passages, max_query_tokens,
                                              max_passage_tokens, self.max_length)  # fmt: skip
                queries, passages = list(queries), list(passages)
                parts = (slice(i, i + _CHUNK_PAIRS) for i in range(0, len(queries), _CHUNK_PAIRS))
                chunks = [  # the tokenizer's per-pair objects live for one chunk at a time
                    _flat_pairs(*self._encode(queries[part], passages[part], limit, truncation_side))
                    for part in parts
                ]
            finally:
                self.tokenizer.truncation_side = default_side
        return _concatenate(chunks, self.uses_token_types)

    def _encode(
        self, queries: list[str], passages: list[str], limit: int, side: TruncationSide
    ) -> tuple[list[list[int]], list[list[int]] | None, np.ndarray]:
        """Token ids, token type ids (if the model takes them) and truncated flags of each pair."""
        if self._backend is not None:
            return self._encode_direct(self._backend, queries, passages, limit, side)
        return self._encode_wrapped(queries, passages, limit)

    def _encode_wrapped(
        self, queries: list[str], passages: list[str], limit: int
    ) -> tuple[list[list[int]], list[list[int]] | None, np.ndarray]:
        """``_encode`` through the Hugging Face wrapper (truncating at its ``truncation_side``)."""
        encoding = self.tokenizer(queries, passages, truncation="longest_first", max_length=limit)
        ids = encoding["input_ids"]
        if encoding.encodings is not None:
            truncated = np.array([len(enc.overflowing) > 0 for enc in encoding.encodings], dtype=bool)
        else:  # slow tokenizer: a pair that fills the limit exactly is counted as truncated
            truncated = np.array([len(row) >= limit for row in ids], dtype=bool)
        return ids, encoding.get("token_type_ids") if self.uses_token_types else None, truncated

    def _encode_direct(
        self, backend: Any, queries: list[str], passages: list[str], limit: int, side: TruncationSide
    ) -> tuple[list[list[int]], list[list[int]] | None, np.ndarray]:
        """``_encode`` through the Rust tokenizer itself."""
        backend.enable_truncation(limit, strategy="longest_first", direction=side)
        backend.no_padding()
        encodings = _encode_batch(backend)(list(zip(queries, passages, strict=True)))
        types = [enc.type_ids for enc in encodings] if self.uses_token_types else None
        truncated = np.fromiter((bool(enc.overflowing) for enc in encodings), bool, len(encodings))
        return [enc.ids for enc in encodings], types, truncated

    def _checked_backend(self) -> Any | None:
        """The Rust tokenizer behind a fast tokenizer, if it encodes probe pairs as the wrapper does.

        Calling it directly skips the wrapper's per-pair Python objects (~1.5x faster tokenization);
        a tokenizer whose wrapper adds anything of its own keeps the wrapper.
        """
        if not self.tokenizer.is_fast:
            return None
        backend, default_side = self.tokenizer.backend_tokenizer, self.tokenizer.truncation_side
        probes = ["What is a Café?", "q", "x"], ["Über " * 40 + "solar PANELS", "x y", "a\tb  c"]
        for side in ("right", "left"):
            self.tokenizer.truncation_side = side
            wrapped = self._encode_wrapped(*probes, limit=24)
            direct = self._encode_direct(backend, *probes, limit=24, side=side)
            self.tokenizer.truncation_side = default_side
            if wrapped[:2] != direct[:2] or not np.array_equal(wrapped[2], direct[2]):
                logger.warning("tokenizing through the wrapper: its backend encodes differently")
                return None
        return backend


def cut_pairs(
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str],
    passages: Sequence[str],
    max_query_tokens: int | None,
    max_passage_tokens: int | None,
    limit: int,
) -> tuple[Sequence[str], Sequence[str]]:
    """Queries and passages each cut to its cap of its own tokens (no text keeps over ``limit`` anyway)."""
    if max_query_tokens is not None:
        queries = cut_texts(tokenizer, queries, min(max_query_tokens, limit))
    if max_passage_tokens is not None:
        passages = cut_texts(tokenizer, passages, min(max_passage_tokens, limit))
    return queries, passages


def cut_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Each text cut to at most ``max_tokens`` of its own tokens, from the tokenizer's side.

    The cut falls between whole words (a word split across the limit is left out), so the text
    re-tokenizes to exactly the kept tokens. A text repeated (a request's query) is cut once.
    """
    unique = list(dict.fromkeys(texts))
    cut = dict(zip(unique, _cut_unique(tokenizer, unique, max_tokens), strict=True))
    return [cut[text] for text in texts]


def _cut_unique(tokenizer: PreTrainedTokenizerBase, passages: list[str], max_tokens: int) -> list[str]:
    if not tokenizer.is_fast:  # no offsets: rebuild the text from the kept tokens
        ids = tokenizer(list(passages), add_special_tokens=False, truncation=True, max_length=max_tokens)
        return list(tokenizer.batch_decode(ids["input_ids"]))
    encoding = tokenizer(
        list(passages),
        add_special_tokens=False,
        truncation=True,
        max_length=max_tokens + 1,  # one more token tells whether the limit splits a word
        return_offsets_mapping=True,
    )
    from_left = tokenizer.truncation_side == "left"
    cut = []
    for index, text in enumerate(passages):
        offsets, words = encoding["offset_mapping"][index], encoding.word_ids(index)
        if len(offsets) <= max_tokens:
            cut.append(text)
            continue
        kept = _whole_word_window(words, max_tokens, from_left)
        cut.append(text[offsets[kept.start][0] : offsets[kept.stop - 1][1]] if kept else "")
    return cut


def _flat_pairs(
    ids: list[list[int]], token_types: list[list[int]] | None, truncated: np.ndarray
) -> EncodedPairs:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    types = None if token_types is None else _flatten(token_types, total)
    return EncodedPairs(_flatten(ids, total), offsets, types, truncated)


def _concatenate(chunks: list[EncodedPairs], with_token_types: bool) -> EncodedPairs:
    if len(chunks) == 1:
        return chunks[0]
    lengths = np.concatenate([np.zeros(1, np.int64), *(chunk.lengths for chunk in chunks)])
    empty = np.empty(0, np.int32)
    return EncodedPairs(
        np.concatenate([empty, *(chunk.input_ids for chunk in chunks)]),
        np.cumsum(lengths),
        np.concatenate([empty, *(chunk.token_type_ids for chunk in chunks)]) if with_token_types else None,
        np.concatenate([np.empty(0, bool), *(chunk.truncated for chunk in chunks)]),
    )


def _flatten(rows: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=total)


def _encode_batch(backend: Any) -> Any:
    """The backend's batch encoder without character offsets where it has one (tokenizers >= 0.21)."""
    return getattr(backend, "encode_batch_fast", backend.encode_batch)


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


def _effective_max_length(requested: int, tokenizer: PreTrainedTokenizerBase, config: Any) -> int:
    limits = [requested, getattr(config, "max_position_embeddings", requested)]
    if isinstance(tokenizer.model_max_length, int) and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    return min(limits)
