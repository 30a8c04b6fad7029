"""Long documents: the windows a long passage is split into, and its score as its best window's."""

import itertools

import numpy as np
import pytest

from reranker.chunking import best_of, split_long
from reranker.model import CrossEncoderModel
from tests.helpers import WORDS, build_tiny_cross_encoder

pytestmark = pytest.mark.model

QUERY = "how do solar panels work"


def long_document(tokens: int, seed: int = 0) -> str:
    """A text of ``tokens`` one-token words (the tiny vocabulary's whole words)."""
    words = [word for word in WORDS if " " not in word]
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(words, size=tokens))


@pytest.fixture(scope="module")
def model_512(tmp_path_factory):
    """A tiny BERT that holds 512 tokens per pair, like TinyBERT-L2 (2 layers)."""
    return CrossEncoderModel(str(build_tiny_cross_encoder(tmp_path_factory.mktemp("m512"), max_position=512)))


def test_windows_fit_cover_and_overlap(model_512):
    """A 3,000-token passage: windows that each fill a pair without truncation, from its first word to
    its last, each sharing the overlap with the one before; a passage that fits stays as it is."""
    document = long_document(3000)
    split = split_long(model_512.pair_tokenizer, [QUERY, QUERY], [document, "solar panels"], 10, 32)
    windows = split.passages[:-1]
    assert split.passages[-1] == "solar panels" and split.owner.tolist() == [0] * len(windows) + [1]
    encoded = model_512.tokenize(split.queries, split.passages)
    assert not encoded.truncated.any() and encoded.lengths[:-1].max() == 512
    words = [window.split() for window in windows]
    assert words[0][0] == document.split()[0] and words[-1][-1] == document.split()[-1]
    for before, after in itertools.pairwise(words):
        assert before[-32:] == after[:32]  # one-token words: the overlap is 32 words
    assert not split.cut.any() and len(windows) == 7  # ceil((3000 - 505) / (505 - 32)) + 1


def test_a_passage_past_max_chunks_is_cut(model_512):
    split = split_long(model_512.pair_tokenizer, [QUERY], [long_document(3000)], 3, 32)
    assert len(split.passages) == 3 and split.cut.tolist() == [True]


def test_the_score_is_the_best_window_scored_alone(model_512):
    """max_chunks_per_doc: a long passage's score is the max of its windows scored one by one; a short
    one's is unchanged; the default cuts the long passage to fit (the model on the cut text)."""
    documents = [long_document(3000, seed) for seed in range(3)] + ["solar panels convert sunlight"]
    queries = [QUERY] * 4
    chunked = model_512.score(queries, documents, max_chunks_per_doc=10)
    split = split_long(model_512.pair_tokenizer, queries, documents, 10, 32)
    alone = np.array(
        [model_512.score([q], [p]).scores[0] for q, p in zip(split.queries, split.passages, strict=True)]
    )
    np.testing.assert_allclose(chunked.scores, best_of(alone, split.owner), atol=1e-6)
    assert chunked.num_truncated == 0
    cut = model_512.score(queries, documents)
    first_windows = [split.passages[int(np.flatnonzero(split.owner == i)[0])] for i in range(4)]
    np.testing.assert_allclose(cut.scores, model_512.score(queries, first_windows).scores, atol=1e-6)
    assert cut.num_truncated == 3 and not np.allclose(cut.scores[:3], chunked.scores[:3])


@pytest.mark.parametrize(
    "words",
    [
        [0, *[1] * 5, *range(2, 20)],  # a word longer than a window
        [*range(8), *[8] * 4, *range(9, 30)],  # a word across a window's end
        [0] * 40,  # one word (no spaces: CJK text under a Metaspace tokenizer)
        list(range(40)),
    ],
)
def test_windows_cover_every_token_even_across_long_words(words):
    """Every token is in a window, no window is over the room or under a step unless it is the last,
    and windows advance (the bug: gaps and one-token windows where a word was long)."""
    from reranker.chunking import _windows

    for room, overlap in [(4, 1), (10, 2), (7, 3)]:
        spans = _windows(words, room, overlap, 1000)
        covered = set().union(*(range(start, stop) for start, stop in spans))
        assert covered == set(range(len(words))), (room, overlap, spans)
        assert all(stop - start <= room for start, stop in spans)
        assert all(stop - start >= room - overlap for start, stop in spans[:-1]), spans
        assert all(a[0] < b[0] for a, b in itertools.pairwise(spans))


def test_best_of_keeps_nan_only_where_every_window_is_nan():
    scores = np.array([np.nan, 1.0, np.nan, np.nan, 2.0])
    best = best_of(scores, np.array([0, 0, 1, 1, 2]))
    assert best[0] == 1.0 and np.isnan(best[1]) and best[2] == 2.0


def test_windows_fill_a_smaller_max_length_and_an_llm_window_is_not_truncated(model_512, llm_reranker_dir):
    """score(max_length=...) sizes the windows to it; an LLM reranker's full windows (which its encoder
    flags as at the limit) do not make the passage count as cut."""
    document = long_document(600)
    small = model_512.score([QUERY], [document], max_length=32, max_chunks_per_doc=100)
    assert small.num_truncated == 0
    llm = CrossEncoderModel(str(llm_reranker_dir), max_length=256)
    chunked = llm.score([QUERY], [document], max_chunks_per_doc=100)
    split = llm.split_long([QUERY], [document], 100)
    alone = [llm.score([QUERY], [window]).scores[0] for window in split.passages]
    assert chunked.num_truncated == 0 and len(alone) > 1
    np.testing.assert_allclose(chunked.scores, [max(alone)], atol=1e-5)
