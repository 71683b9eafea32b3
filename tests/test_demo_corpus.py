"""The demo's corpus builder (examples/corpus.py); its pattern tagger is the library's
(tests/test_clusters.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from corpus import build_corpus, repeated_sequences  # noqa: E402


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
