"""The demo's corpus builder and pattern tagger (examples/corpus.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from corpus import build_corpus, repeated_sequences, tag_tokens  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(seed=3)


def test_corpus_is_deterministic_and_split(corpus):
    again = build_corpus(seed=3)
    other = build_corpus(seed=4)
    for domain in ("code", "prose", "legal"):
        assert corpus.train[domain] == again.train[domain]
        assert corpus.held_out[domain] == again.held_out[domain]
        assert corpus.train[domain] and corpus.held_out[domain]
        assert not set(corpus.train[domain]) & set(corpus.held_out[domain])
    assert corpus.held_out["code"] != other.held_out["code"]
    assert any("def " in text for text in corpus.train["code"])
    assert any("Permission" in text or "License" in text for text in corpus.train["legal"]
               + corpus.held_out["legal"])


def test_repeated_sequences_repeat_with_their_period():
    ids = repeated_sequences(20, 64, 50, torch.Generator().manual_seed(0))
    for row in ids:
        period = next(p for p in range(8, 41) if torch.equal(row[p:], row[:-p]))
        assert 8 <= period <= 40


def tags_of(pieces: list[str]) -> list[str]:
    """Tags of hand-made token sequences; ids are the pieces' identities."""
    ids = [hash(piece) for piece in pieces]
    return tag_tokens(ids, pieces)


def test_word_and_spacing_tags():
    pieces = ["The", " bro", "wn", " un", "believ", "able", "\n", "    ", "ret", "urn",
              " 42", "."]
    # entry t tags pieces[t + 1], predicted from pieces[:t + 1]
    assert tags_of(pieces) == ["word start", "word end", "word start", "word part",
                               "word end", "spacing", "spacing", "word start", "word end",
                               "numeric", "other", "other"]


def test_delimiter_tags():
    pieces = ["f", "(", "x", ")", " [", "'", "a", "'", "]"]
    assert tags_of(pieces) == ["open", "word start", "close", "open", "open", "word start",
                               "close", "close", "other"]


def test_induction_tag_needs_the_same_continuation():
    pieces = ["A", " cat", " sat", ".", " A", " cat", " sat", " A", " cat", " ran"]
    tags = tags_of(pieces)
    assert tags[4] == "word start"  # " A" has not occurred before ("A" is another token)
    assert tags[5] == "induction"  # " cat" -> " sat", as after the earlier " cat"
    assert tags[7] == "induction"  # " A" -> " cat", as after the earlier " A"
    assert tags[8] == "word start"  # " cat" -> " ran": no earlier " cat" went on so
