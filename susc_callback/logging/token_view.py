"""The report's per-token view: every probe sequence with each predicted token shaded by a
chosen quantity (:mod:`susc_callback.analysis.token_views`) of a chosen component at a
chosen snapshot.

The page holds the token text once. The shown snapshot's default quantity for the first
component is coloured inline, so the view reads without JavaScript. Every (snapshot,
quantity) pair is embedded as JSON, each component's row quantized to integers in
[-100, 100] of its largest magnitude, and a small script recolours the spans when a
selector changes.
"""

from __future__ import annotations

import html
import json

import numpy as np

from susc_callback.analysis.run_summary import RunSummary
from susc_callback.analysis.token_views import (
    DEFAULT_QUANTITY,
    DESCRIPTIONS,
    TOKEN_QUANTITIES,
    token_quantity,
)
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.logging.figures import NEGATIVE_RGB, POSITIVE_RGB

LEVELS = 100
"""Quantization of the embedded values: a shade differs from the exact one by < 1 %."""


def token_colour(value: float, scale: float) -> tuple[int, int, int]:
    """Background of a token: white at 0, green (> 0) or red (< 0) at ``|value| = scale``."""
    if not np.isfinite(value) or scale <= 0:
        return (255, 255, 255)
    weight = min(1.0, abs(value) / scale)
    target = POSITIVE_RGB if value > 0 else NEGATIVE_RGB
    return tuple(int(round(255 + weight * (c - 255))) for c in target)


def quantities_of(results: list[SusceptibilityResult]) -> list[str]:
    """The quantities every result can give (older results lack chi's covariance part)."""
    if all(r.chi_covariance is not None for r in results):
        return list(TOKEN_QUANTITIES)
    return ["chi"]


def token_view_section(summary: RunSummary, texts: list[list[str]]) -> str:
    """The HTML of the view: selectors, the sequences, the embedded values, the script."""
    shown, standardization = summary.shown, summary.standardization
    quantities = quantities_of(summary.results)
    default = DEFAULT_QUANTITY if DEFAULT_QUANTITY in quantities else "chi"
    payload = {"quantities": quantities, "default": default,
               "steps": [_step_key(r) for r in summary.results], "shown": _step_key(shown),
               "descriptions": {q: DESCRIPTIONS[q] for q in quantities},
               "negative": NEGATIVE_RGB, "positive": POSITIVE_RGB, "levels": LEVELS,
               "values": {f"{_step_key(r)}|{q}": _quantized(token_quantity(r, q,
                                                                           standardization))
                          for r in summary.results for q in quantities}}
    first = int(np.flatnonzero(shown.finite_components)[0]) \
        if shown.finite_components.any() else 0
    inline = token_quantity(shown, default, standardization)[first]
    return (f"<h2>Per-token attribution</h2><p>Each token is shaded by a quantity of the "
            f"chosen component for predicting it ({standardization}-standardized): "
            '<span class="key neg">red: expresses (&lt; 0)</span> '
            '<span class="key pos">green: suppresses (&gt; 0)</span>, white: 0, intensity '
            "relative to the component's largest magnitude at that snapshot. Hover for "
            f'values.</p><p id="quantity-help">Showing: {html.escape(DESCRIPTIONS[default])}.'
            "</p>" + _selectors(shown, summary.results, quantities, default, first)
            + _sequences(shown, texts, inline)
            + f'<script type="application/json" id="token-data">{json.dumps(payload)}'
            "</script>")


def _step_key(result: SusceptibilityResult) -> str:
    return "none" if result.step is None else str(result.step)


def _quantized(values: np.ndarray) -> dict[str, list]:
    """Per component: its largest magnitude and its row in integer steps of it."""
    scales, rows = [], []
    for row in values:
        scale = float(np.nanmax(np.abs(row))) if np.isfinite(row).any() else 0.0
        scales.append(scale)
        rows.append(np.round(np.nan_to_num(row) / scale * LEVELS).astype(int).tolist()
                    if scale > 0 else [0] * len(row))
    return {"scale": scales, "rows": rows}


def _selectors(shown: SusceptibilityResult, results: list[SusceptibilityResult],
               quantities: list[str], default: str, first: int) -> str:
    def options(items: list[tuple[str, str]], selected: str) -> str:
        return "".join(f'<option value="{html.escape(value)}"'
                       f'{" selected" if value == selected else ""}>{html.escape(label)}'
                       "</option>" for value, label in items)

    components = options([(str(i), n) for i, n in enumerate(shown.component_names)],
                         str(first))
    steps = options([(_step_key(r), f"step {_step_key(r)}") for r in results],
                    _step_key(shown))
    shown_quantities = options([(q, q) for q in quantities], default)
    return (f'<p><label>Component <select id="component">{components}</select></label> '
            f'<label>Quantity <select id="quantity">{shown_quantities}</select></label> '
            f'<label>Snapshot <select id="step">{steps}</select></label></p>')


def _sequences(result: SusceptibilityResult, texts: list[list[str]], inline: np.ndarray
               ) -> str:
    where = {(int(s), int(t) + 1): i for i, (s, t) in
             enumerate(zip(result.token_sequence, result.token_position))}
    scale = float(np.nanmax(np.abs(inline))) if np.isfinite(inline).any() else 0.0
    mask, lines = result.probe_attention_mask, []
    for s, tokens in enumerate(texts):
        spans = []
        for t, text in enumerate(tokens):
            if not mask[s, t]:
                continue
            i = where.get((s, t))
            if i is None:
                spans.append(f'<span class="tok">{html.escape(text)}</span>')
                continue
            colour = "rgb({},{},{})".format(*token_colour(inline[i], scale))
            spans.append(f'<span class="tok" data-token="{i}" data-value="{inline[i]:.6g}" '
                         f'style="background:{colour}">{html.escape(text)}</span>')
        dataset = html.escape(result.sequence_datasets[s])
        lines.append(f'<div class="seq"><span class="label">{dataset}</span>'
                     f'{"".join(spans)}</div>')
    return f'<div class="tokens">{"".join(lines)}</div>'


SCRIPT = """
const data = JSON.parse(document.getElementById("token-data").textContent);
const picked = id => document.getElementById(id).value;
function shade(level) {
  const target = level < 0 ? data.negative : data.positive;
  const weight = Math.min(1, Math.abs(level) / data.levels);
  return "rgb(" + target.map(c => Math.round(255 + weight * (c - 255))).join(",") + ")";
}
function recolour() {
  const entry = data.values[picked("step") + "|" + picked("quantity")];
  const row = Number(picked("component"));
  const levels = entry.rows[row], scale = entry.scale[row];
  document.getElementById("quantity-help").textContent =
    "Showing: " + data.descriptions[picked("quantity")] + ".";
  document.querySelectorAll(".tok[data-token]").forEach(span => {
    const level = levels[Number(span.dataset.token)];
    span.style.background = shade(level);
    span.title = (level * scale / data.levels).toPrecision(3);
  });
}
recolour();
["component", "quantity", "step"].forEach(
  id => document.getElementById(id).addEventListener("change", recolour));
"""
"""Recolours the spans from the embedded values (``token_colour`` in JavaScript)."""
