import logging

import numpy as np
import pytest

from reranker.settings import ModelSettings
from reranker.tokenizer import PairTokenizer
from tests.helpers import TWIN_MODEL, require

pytestmark = pytest.mark.model

QUERIES = ["How do SOLAR panels work?", "vitamin d", "q", "seasons"]
PASSAGES = [
    "solar panels convert sunlight into electricity " * 20,
    "Vitamin D comes from sunlight on the skin",
    "x",
    "the tilt of the earth's axis causes the seasons " * 3,
]


def both_ways(tokenizer: PairTokenizer, **options) -> tuple:
    """The same call through the Rust backend and through the Hugging Face wrapper."""
    direct = tokenizer.tokenize(QUERIES, PASSAGES, **options)
    backend, tokenizer._backend = tokenizer._backend, None
    try:
        wrapped = tokenizer.tokenize(QUERIES, PASSAGES, **options)
    finally:
        tokenizer._backend = backend
    return direct, wrapped


def assert_same(direct, wrapped) -> None:
    np.testing.assert_array_equal(direct.input_ids, wrapped.input_ids)
    np.testing.assert_array_equal(direct.offsets, wrapped.offsets)
    np.testing.assert_array_equal(direct.token_type_ids, wrapped.token_type_ids)
    np.testing.assert_array_equal(direct.truncated, wrapped.truncated)


@pytest.mark.parametrize(
    "options",
    [{}, {"max_length": 16}, {"max_length": 16, "truncation_side": "left"}, {"max_passage_tokens": 5}],
)
def test_backend_encodes_as_the_wrapper(tiny_model_dir, options):
    """Tokenizing through the Rust backend gives the wrapper's ids, types and truncation flags."""
    tokenizer = PairTokenizer(ModelSettings(model=str(tiny_model_dir)))
    assert tokenizer._backend is not None
    direct, wrapped = both_ways(tokenizer, **options)
    assert_same(direct, wrapped)
    assert direct.truncated[0] == ("max_passage_tokens" not in options)  # flags really compared


def test_backend_encodes_as_the_wrapper_on_the_real_vocabulary():
    """The same on the real TinyBERT tokenizer (the twin's byte-identical vocabulary)."""
    tokenizer = PairTokenizer(ModelSettings(model=str(require(TWIN_MODEL)), max_length=32))
    assert tokenizer._backend is not None
    assert_same(*both_ways(tokenizer, truncation_side="left"))
    assert_same(*both_ways(tokenizer))


def test_a_backend_that_disagrees_is_not_used(tiny_model_dir, monkeypatch, caplog):
    """If the backend's probe encoding differs from the wrapper's, the wrapper is kept."""

    def off_by_one(self, backend, *args, **kwargs):
        ids, types, truncated = original(self, backend, *args, **kwargs)
        return [row[:-1] for row in ids], types, truncated

    original = PairTokenizer._encode_direct
    monkeypatch.setattr(PairTokenizer, "_encode_direct", off_by_one)
    with caplog.at_level(logging.WARNING):
        tokenizer = PairTokenizer(ModelSettings(model=str(tiny_model_dir)))
    assert tokenizer._backend is None
    assert "through the wrapper" in caplog.text
    assert tokenizer.tokenize(["q"], ["x"]).pair_ids()[0][-1] == tokenizer.tokenizer.sep_token_id


def test_chunked_tokenization_equals_one_pass(tiny_model_dir, monkeypatch):
    """Pairs tokenized in chunks (to bound memory) come out as one pass would give them."""
    from reranker import tokenizer as module

    tokenizer = PairTokenizer(ModelSettings(model=str(tiny_model_dir)))
    queries, passages = QUERIES * 3, PASSAGES[::-1] * 3
    whole = tokenizer.tokenize(queries, passages)
    monkeypatch.setattr(module, "_CHUNK_PAIRS", 5)
    assert_same(tokenizer.tokenize(queries, passages), whole)
    empty = tokenizer.tokenize([], [])
    assert (len(empty), empty.input_ids.size, empty.token_type_ids.size) == (0, 0, 0)


def test_a_huge_passage_token_cap_is_no_cap(tiny_model_dir):
    """max_passage_tokens far past max_length (a client may send any int) cuts nothing and never overflows."""
    tokenizer = PairTokenizer(ModelSettings(model=str(tiny_model_dir)))
    uncut = tokenizer.tokenize(QUERIES, PASSAGES)
    for cap in (tokenizer.max_length, 2**40, 10**20):
        assert_same(tokenizer.tokenize(QUERIES, PASSAGES, max_passage_tokens=cap), uncut)
