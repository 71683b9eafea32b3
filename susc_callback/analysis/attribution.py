"""Per-token attribution: which probe tokens each component expresses or suppresses most.

A component *expresses* a token's pattern when its susceptibility is most negative and
*suppresses* it when most positive (see :class:`SusceptibilityResult`). Probe token ``i``
is the loss of predicting ``probe_input_ids[s, t + 1]`` after ``probe_input_ids[s, :t + 1]``
with ``(s, t) = (token_sequence[i], token_position[i])``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import numpy as np

from susc_callback.estimator.results import SusceptibilityResult

Decode = Callable[[int], str]
"""Token id -> printable text."""


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def visible(text: str) -> str:
    """``text`` with backslashes and control characters escaped (``\\n``, ``\\x00``), so
    that it survives tables, TSV files and HTML (no NUL bytes)."""
    return "".join(_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if unicodedata.category(char)
                                          == "Cc" else char) for char in text)


def stored_decoder(result: SusceptibilityResult) -> Decode:
    """Token text from the probe token texts stored in ``result.extra`` (see
    :func:`~susc_callback.data.probes.probe_token_texts`), ``<id>`` for unknown ids."""
    texts = result.extra.get("probe_tokens") or []
    lookup = {int(t): text for row, ids in zip(texts, result.probe_input_ids)
              for text, t in zip(row, ids)}
    return lambda token_id: visible(lookup.get(int(token_id), f"<{int(token_id)}>"))


def extreme_tokens(result: SusceptibilityResult, component: int, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` most negative (expressed) and ``k`` most positive (suppressed)
    probe tokens of row ``component``; empty for a failed component."""
    row = result.chi[component]
    if not np.isfinite(row).all():
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    order = np.argsort(row, kind="stable")
    return order[:k], order[::-1][:k]


def token_in_context(result: SusceptibilityResult, index: int, decode: Decode,
                     before: int = 6) -> tuple[str, str]:
    """``(context, predicted token)`` text of probe token ``index``."""
    sequence, position = int(result.token_sequence[index]), int(result.token_position[index])
    ids = result.probe_input_ids[sequence]
    context = "".join(decode(t) for t in ids[max(0, position + 1 - before):position + 1])
    return context, decode(ids[position + 1]) if position + 1 < len(ids) else ""


def top_tokens_markdown(result: SusceptibilityResult, decode: Decode, k: int = 5) -> str:
    """A Markdown table: per component, its most expressed and most suppressed tokens with
    context (``context[token]``) and their susceptibility."""
    def cell(indices: np.ndarray, row: int) -> str:
        parts = []
        for i in indices:
            context, token = token_in_context(result, int(i), decode)
            parts.append(f"`{_escape(context)}`**[{_escape(token)}]** "
                         f"({result.chi[row, i]:+.3g})")
        return "<br>".join(parts) or "(failed)"

    lines = ["| component | expresses (most negative) | suppresses (most positive) |",
             "|---|---|---|"]
    for row, name in enumerate(result.component_names):
        expressed, suppressed = extreme_tokens(result, row, k)
        lines.append(f"| {name} | {cell(expressed, row)} | {cell(suppressed, row)} |")
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")
