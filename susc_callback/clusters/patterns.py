"""Token pattern labels: a rule-based tag for every probe token, to colour every view.

Probe token ``(s, t)`` is the prediction of ``input_ids[s, t + 1]`` from the tokens up to
``t``; its label describes that predicted token in its context. The rules are tried in
order and the first that holds names the token (``"other"`` if none does):

1. ``induction``: the token continues a bigram seen earlier in the sequence
   (``ids[t], ids[t+1]`` occurred as ``ids[j], ids[j+1]`` with ``j < t``): an induction
   head can predict it by copying;
2. ``open`` / ``close``: an opening or closing bracket or quote (``( [ { <`` and
   ``) ] } >``; a quote opens when an even number of the same quote precede it);
3. ``delimiter``: other punctuation (``. , ; :`` ...);
4. ``digit``: a number;
5. ``spacing``: whitespace only (spaces, tabs, newlines);
6. ``word start``: letters after a space or a non-letter (GPT-2 style ``" the"``);
7. ``word part`` / ``word end``: letters that continue a word, which goes on after the
   token or stops there.

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


def _neighbour(context: TokenContext, offset: int) -> str:
    index = context.position + offset
    return context.texts[index] if 0 <= index < len(context.texts) else ""


OPENERS, CLOSERS, QUOTES = set("([{<"), set(")]}>"), set("'\"`")


def _bracket(context: TokenContext) -> str | None:
    """"open" or "close" for a token of brackets and quotes only, else None."""
    stripped = (context.text or "").strip()
    if not stripped or not all(c in OPENERS | CLOSERS | QUOTES for c in stripped):
        return None
    first = stripped[0]
    if first in QUOTES:
        before = "".join(context.texts[:context.position])
        return "open" if before.count(first) % 2 == 0 else "close"
    return "open" if first in OPENERS else "close"


def _is_word(text: str) -> bool:
    return bool(text.strip()) and text.strip().isalpha()


def _starts_word(context: TokenContext) -> bool:
    previous = _neighbour(context, -1)
    return context.text[0].isspace() or not previous or not previous[-1].isalpha()


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith(("P", "S"))


DEFAULT_RULES: dict[str, Rule] = {
    "induction": continues_earlier_bigram,
    "open": lambda context: _bracket(context) == "open",
    "close": lambda context: _bracket(context) == "close",
    "delimiter": _text_rule(lambda text: bool(text.strip())
                            and all(_is_punctuation(c) for c in text.strip())),
    "digit": _text_rule(lambda text: text.strip().isdigit()),
    "spacing": _text_rule(lambda text: text.isspace()),
    "word start": lambda context: _is_word(context.text or "") and _starts_word(context),
    "word part": lambda context: _is_word(context.text or "")
    and _neighbour(context, 1)[:1].isalpha(),
    "word end": lambda context: _is_word(context.text or ""),
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
