"""Token pattern labels: a rule-based tag for every probe token, to colour every view.

Probe token ``(s, t)`` is the prediction of ``input_ids[s, t + 1]`` from the tokens up to
``t``; its label describes that predicted token in its context. The rules are tried in
order and the first that holds names the token (``"other"`` if none does):

1. ``induction``: the token continues a bigram seen earlier in the sequence
   (``ids[t], ids[t+1]`` occurred as ``ids[j], ids[j+1]`` with ``j < t``): an induction
   head can predict it by copying;
2. ``spacing``: whitespace only (spaces, tabs, newlines);
3. ``delimiter``: punctuation or brackets only;
4. ``digit``: contains a digit;
5. ``word start``: a space then a letter (GPT-2 style ``" the"``), or a capitalised letter;
6. ``word part``: letters without a leading space (the continuation of a word, ``"ing"``,
   ``"'s"``).

The text rules need the token's text (stored with results by the callback and ``susc
analyze``); without it, tokens that are not ``induction`` are ``other``. Add rules with
``rules=`` (they go first) or replace the list: a rule is ``fn(context) -> bool`` on a
:class:`TokenContext`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenContext:
    """What a rule sees: the sequence's token ids and texts (texts None when unknown),
    ``position``, the index of the predicted token in them (``t + 1``), and
    ``repeats_bigram``: whether ``(ids[position - 1], ids[position])`` occurred earlier in
    the sequence."""

    ids: Sequence[int]
    texts: Sequence[str] | None
    position: int
    repeats_bigram: bool

    @property
    def text(self) -> str | None:
        return None if self.texts is None else self.texts[self.position]


Rule = Callable[[TokenContext], bool]


def continues_earlier_bigram(context: TokenContext) -> bool:
    return context.repeats_bigram


def repeated_bigrams(ids: Sequence[int]) -> list[bool]:
    """``[t]``: whether the bigram ending at ``t`` occurred earlier in ``ids`` (one pass)."""
    seen, repeats = set(), [False] * len(ids)
    for t in range(1, len(ids)):
        bigram = (ids[t - 1], ids[t])
        repeats[t] = bigram in seen
        seen.add(bigram)
    return repeats


def _text_rule(test: Callable[[str], bool]) -> Rule:
    return lambda context: bool(context.text) and test(context.text)


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith(("P", "S"))


DEFAULT_RULES: dict[str, Rule] = {
    "induction": continues_earlier_bigram,
    "spacing": _text_rule(lambda text: text.isspace()),
    "delimiter": _text_rule(lambda text: all(_is_punctuation(c) for c in text.strip())
                            and not text.isspace()),
    "digit": _text_rule(lambda text: any(c.isdigit() for c in text)),
    "word start": _text_rule(lambda text: (text[0].isspace() and text[1:2].isalpha())
                             or text[0].isupper()),
    "word part": _text_rule(lambda text: not text[0].isspace()
                            and any(c.isalpha() for c in text)),
}
OTHER = "other"


def tag_tokens(token_sequence: np.ndarray, token_position: np.ndarray,
               input_ids: np.ndarray, texts: Sequence[Sequence[str]] | None = None,
               rules: dict[str, Rule] | None = None, replace: bool = False) -> np.ndarray:
    """``(P,)`` pattern label of every probe token (see the module docstring). ``rules``
    are tried before the default ones, or instead of them with ``replace=True``."""
    ordered = dict(rules or {}) if replace else {**(rules or {}), **DEFAULT_RULES}
    labels = np.empty(len(token_sequence), dtype=object)
    sequences = {s: input_ids[s].tolist() for s in np.unique(token_sequence).tolist()}
    repeats = {s: repeated_bigrams(ids) for s, ids in sequences.items()}
    for k, (s, t) in enumerate(zip(token_sequence.tolist(), token_position.tolist())):
        context = TokenContext(sequences[s], None if texts is None else texts[s], t + 1,
                               repeats[s][t + 1])
        labels[k] = next((name for name, rule in ordered.items() if rule(context)), OTHER)
    return labels.astype(str)


def result_patterns(result, rules: dict[str, Rule] | None = None) -> np.ndarray:
    """The labels of a :class:`~susc_callback.estimator.results.SusceptibilityResult`'s
    probe tokens, with the token texts it stores (``extra["probe_tokens"]``)."""
    return tag_tokens(result.token_sequence, result.token_position, result.probe_input_ids,
                      result.extra.get("probe_tokens"), rules)
