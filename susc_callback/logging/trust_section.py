"""The report's "How far to trust this snapshot" section: chain diagnostics, localisation
shares and split-half reliability per component, and the problems they show in words."""

from __future__ import annotations

import html

import numpy as np

from susc_callback.analysis.diagnostics import (
    localisation_shares,
    snapshot_problems,
    trace_diagnostics,
)
from susc_callback.analysis.pca import SusceptibilityPCA
from susc_callback.analysis.reliability import split_half_or_none
from susc_callback.estimator.results import SusceptibilityResult


def trust_section(result: SusceptibilityResult, pca: SusceptibilityPCA | None) -> str:
    """The section for snapshot ``result`` (split-half PCs with ``pca``'s settings)."""
    halves = split_half_or_none(result, pca)
    diagnostics = trace_diagnostics(result)
    shares = localisation_shares(result)
    split = {} if halves is None else dict(zip(halves.component_names, halves.component_r))
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>{_cell(d.rhat, '.2f')}{_cell(d.ess, '.0f')}"
        f"{_cell(d.drift, '+.1f')}{_cell(shares.get(name), '.0%')}"
        f"{_cell(split.get(name), '.3f')}</tr>" for name, d in diagnostics.items())
    problems = snapshot_problems(result)
    listed = "".join(f"<li>{html.escape(p)}</li>" for p in problems) or \
        "<li>none: every chain group's traces are stationary and agree</li>"
    summary = "" if halves is None else (
        f"<p>Split-half reliability (chi from the first half of the chains against the "
        f"second): whole matrix r = {halves.matrix_r:.3f}; PC loadings r = "
        + ", ".join(f"PC{k + 1} {r:.2f}" for k, r in enumerate(halves.loadings_r))
        + f"; two whole estimates would correlate at about "
        f"{np.nanmedian(halves.whole_estimate_r):.3f} per component (Spearman-Brown, "
        "median).</p>")
    return (f"<h2>How far to trust step {result.step}</h2>"
            "<p>Per chain group: split R-hat (above 1.1 the chains disagree), effective "
            "sample size of the pooled draws, drift of the mean probe loss over the draws "
            "(beyond ±4 standard errors the traces trend), the share of the posterior's "
            "spread set by the localisation (near 100 %: the loss hardly confines the "
            "component), and the split-half correlation of its per-token row.</p>"
            f"<ul>{listed}</ul>{summary}<table><tr><th>component</th><th>R-hat</th>"
            "<th>ESS</th><th>drift</th><th>localisation</th><th>split-half r</th></tr>"
            f"{rows}</table>")


def _cell(value: float | None, spec: str) -> str:
    if value is None or not np.isfinite(value):
        return "<td>–</td>"
    return f"<td>{format(value, spec)}</td>"
