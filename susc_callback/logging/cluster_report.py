"""The report's cluster browser and body plan (:mod:`susc_callback.clusters`).

For the shown snapshot: every cluster with its size, its pattern-label and dataset
composition and its most typical tokens in context; a button per cluster outlines its
tokens in the per-token view above (a few lines of inline JavaScript, no server). Then the
clusters' profiles, the body plan of the series and when each cluster formed.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from susc_callback.clusters.snapshot import SeriesClusters, SnapshotClusters
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.logging.cluster_figures import (
    body_plan_figure,
    emergence_figure,
    profiles_figure,
)
from susc_callback.logging.page import figure_section

CONTEXT_TOKENS = 6


def cluster_section(series: SeriesClusters, shown: SusceptibilityResult,
                    texts: list[list[str]], out_dir: Path) -> str:
    """HTML of the clusters of ``shown`` (one of the series' snapshots) and of the series'
    body plan; figures written to ``out_dir/figures``."""
    snapshot = next((s for s in series.snapshots if s.step == shown.step), series.snapshots[-1])
    if snapshot.clusters is None:
        return (f"<h2>Token clusters</h2><p>No clusters at step {shown.step}: "
                f"{html.escape(snapshot.reason or '')}</p>")
    fit = snapshot.clusters
    parts = [f"<h2>Token clusters at step {shown.step}</h2><p>{fit.n_clusters_} clusters of "
             f"the {len(fit.labels_)} probe tokens' standardized susceptibility vectors "
             f"({html.escape(fit.method)}, {html.escape(fit.standardization)}). "
             "<i>Outline</i> marks a cluster's tokens in the per-token view. Whether a "
             "cluster is real or noise: compare two seeds with <code>susc compare</code> "
             "(adjusted Rand index of the clusterings).</p>",
             _table(snapshot, shown, texts),
             f'<script type="application/json" id="cluster-data">'
             f'{json.dumps({"labels": fit.labels_.tolist()})}</script>',
             figure_section("cluster_profiles", "Mean standardized susceptibility of each "
                            "cluster over the components.", profiles_figure(fit, shown.step),
                            out_dir)]
    if series.body_plan is not None:
        parts.append(figure_section(
            "body_plan", "The body plan: every snapshot's probe tokens in one plane, "
            "coloured by pattern label (numbers: the last snapshot's clusters' mean "
            "positions at each snapshot).",
            body_plan_figure(series.body_plan, snapshot.patterns), out_dir))
    last = series.snapshots[-1].clusters
    if series.emergence is not None and len(series.snapshots) > 1:
        parts.append(figure_section(
            "cluster_emergence", "For each cluster of the last snapshot, the best Jaccard "
            "overlap of its tokens with a cluster of every earlier snapshot (above 0.5: it "
            "had formed).", emergence_figure(series.emergence, [s.step for s in
                                                                series.snapshots],
                                             last.sizes_), out_dir))
    return "\n".join(parts)


def _table(snapshot: SnapshotClusters, result: SusceptibilityResult,
           texts: list[list[str]]) -> str:
    fit = snapshot.clusters
    rows = []
    for k in np.argsort(-fit.sizes_, kind="stable"):
        patterns = _composition(fit.pattern_names_, fit.pattern_counts_[k])
        datasets = _composition(result.dataset_names, fit.dataset_counts_[k])
        contexts = "<br>".join(_context(result, int(i), texts) for i in fit.typical_[k][:5])
        rows.append(f'<tr><td><button class="cluster" data-cluster="{k}">outline {k}'
                    f"</button></td><td>{fit.sizes_[k]} ({fit.sizes_[k] / len(fit.labels_):.0%})"
                    f"</td><td>{patterns}</td><td>{datasets}</td><td>{contexts}</td></tr>")
    return ("<table><tr><th>cluster</th><th>tokens</th><th>patterns</th><th>datasets</th>"
            "<th>typical tokens (context[token])</th></tr>" + "".join(rows) + "</table>")


def _composition(names: list[str], counts: np.ndarray, top: int = 3) -> str:
    total = counts.sum()
    order = np.argsort(-counts, kind="stable")[:top]
    return ", ".join(f"{html.escape(names[i])} {counts[i] / total:.0%}" for i in order
                     if counts[i])


def _context(result: SusceptibilityResult, index: int, texts: list[list[str]]) -> str:
    s, t = int(result.token_sequence[index]), int(result.token_position[index])
    context = "".join(texts[s][max(0, t + 1 - CONTEXT_TOKENS):t + 1])
    token = texts[s][t + 1] if t + 1 < len(texts[s]) else ""
    return f"<code>{html.escape(context)}</code><b>[{html.escape(token)}]</b>"


SCRIPT = """
const clusterData = document.getElementById("cluster-data");
if (clusterData) {
  const labels = JSON.parse(clusterData.textContent).labels;
  document.querySelectorAll("button.cluster").forEach(button => {
    button.addEventListener("click", () => {
      const k = Number(button.dataset.cluster);
      const on = !button.classList.contains("active");
      document.querySelectorAll("button.cluster").forEach(b => b.classList.remove("active"));
      if (on) button.classList.add("active");
      document.querySelectorAll(".tok[data-token]").forEach(span => {
        span.classList.toggle("outlined", on && labels[Number(span.dataset.token)] === k);
      });
    });
  });
}
"""
"""Outlines a cluster's tokens in the per-token view (the token view's spans carry the
probe token index in ``data-token``)."""
