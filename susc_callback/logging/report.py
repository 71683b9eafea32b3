"""A self-contained HTML report of saved results: per-token attribution, PCs, trajectories.

The page needs no server and no network: figures are embedded as PNG data URIs (and also
written next to it), the component picker is a few lines of inline JavaScript, and every
token's colour is computed here, so it can be checked against the saved numbers.

Token colours: for the shown component, ``v`` is the token's standardized susceptibility
and ``s`` the largest ``|v|`` of that component; the background blends white (``v = 0``)
towards green (``v > 0``, suppresses) or red (``v < 0``, expresses) by ``|v| / s``.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from susc_callback.analysis.attribution import extreme_tokens, visible
from susc_callback.analysis.pca import Standardization, layer_pcas
from susc_callback.analysis.reliability import loading_errors
from susc_callback.analysis.run_summary import RunSummary, summarize_run
from susc_callback.analysis.written_summary import written_summary
from susc_callback.clusters.snapshot import cluster_series
from susc_callback.data.probes import decode_each
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.influence import InfluenceResult
from susc_callback.logging.cluster_report import SCRIPT as CLUSTER_SCRIPT
from susc_callback.logging.cluster_report import cluster_section
from susc_callback.logging.figures import (
    curves_figure,
    heatmap_figure,
    layer_loadings_figure,
    loadings_figure,
    loss_figure,
    token_trajectory_figure,
    trajectory_figure,
)
from susc_callback.logging.influence_report import influence_section
from susc_callback.logging.page import PAGE, figure_section
from susc_callback.logging.token_view import SCRIPT, token_view_section
from susc_callback.logging.trust_section import trust_section


def _probe_texts(result: SusceptibilityResult, tokenizer: object | None
                 ) -> list[list[str]]:
    """The printable text of every probe token ``[sequence][position]``: stored in the
    result by the callback and the CLI, else decoded with ``tokenizer``, else ``<id>``
    (control characters escaped: no NUL bytes in the page)."""
    texts = result.extra.get("probe_tokens")
    ids = result.probe_input_ids
    if texts is None:
        texts = decode_each(ids, tokenizer) if tokenizer is not None else [
            [f"<{int(t)}>" for t in row] for row in ids]
    return [[visible(text) for text in row] for row in texts]


def write_report(results: list[SusceptibilityResult], out_dir: str | Path, *,
                 tokenizer: object | None = None, step: int | None = None, n_pcs: int = 3,
                 standardization: Standardization = "structural-inference",
                 top_tokens: int = 8, title: str = "Susceptibility report",
                 training_loss: tuple[np.ndarray, np.ndarray] | None = None,
                 influence: list[InfluenceResult] | None = None) -> Path:
    """Write ``out_dir/report.html`` and ``out_dir/figures/*.png``; return the HTML path.

    ``results`` are one run's snapshots (any order); the token view shows snapshot ``step``
    (default the latest). ``training_loss``: ``(steps, losses)`` of the training run
    (:func:`~susc_callback.store.run.training_losses`), drawn with the snapshots marked.
    ``influence``: the run's influence results (``RUN/influence``), shown after the rest.
    """
    summary = summarize_run(results, step=step, n_pcs=n_pcs, standardization=standardization)
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    texts = _probe_texts(summary.shown, tokenizer)
    sections = [
        _header(title, summary),
        token_view_section(summary, texts),
        cluster_section(cluster_series(summary.results), summary.shown, texts, out_dir),
        *(figure_section(name, caption, figure, out_dir)
          for name, (caption, figure) in _figures(summary, training_loss).items()),
        _top_tokens_table(summary.shown, texts, top_tokens),
        trust_section(summary.shown, summary.shown_pca),
    ]
    if influence:
        sections.append(influence_section(influence, out_dir, tokenizer=tokenizer))
    page = PAGE.format(title=html.escape(title), body="\n".join(sections),
                       script=SCRIPT + CLUSTER_SCRIPT)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _figures(summary: RunSummary, training_loss: tuple[np.ndarray, np.ndarray] | None
             ) -> dict[str, tuple[str, Figure]]:
    shown, standardization = summary.shown, summary.standardization
    figures: dict[str, tuple[str, Figure]] = {}
    if training_loss is not None:
        snapshots = [r.step for r in summary.results if r.step is not None]
        figures["training_loss"] = ("The training loss logged by the Trainer; dotted lines "
                                    "mark the snapshots.",
                                    loss_figure(*training_loss, snapshots))
    figures |= {
        "heatmap": ("Mean susceptibility of each component on each probe dataset "
                    "(red: expresses, green: suppresses).", heatmap_figure(shown))}
    if summary.shown_pca is not None:
        errors = loading_errors(shown, summary.shown_pca)
        figures["pc_loadings"] = (
            f"PC loadings of step {shown.step} ({standardization}), PCs in order of "
            "variance" + ("; bars: ± the half-difference standard error (the two halves of "
                          "the chains, one degree of freedom each)." if errors is not None
                          else "."),
            loadings_figure(summary.shown_pca, shown.step, errors=errors))
    layers = layer_pcas(shown, summary.shown_pca.n_components if summary.shown_pca else 3,
                        standardization)
    if len(layers) > 1:
        figures["pc_loadings_per_layer"] = (
            f"A PCA of each layer's components at step {shown.step}, PCs in order of "
            "variance.", layer_loadings_figure(layers, shown.step))
    if summary.series is None:
        return figures
    figures["explained_variance"] = (
        "Explained variance of each snapshot's PCs, aligned to the previous snapshot's: "
        "aligned PC2 follows one direction and need not be the second largest at every "
        "snapshot.",
        curves_figure(summary.steps, summary.explained_variance,
                      "Explained variance of the aligned PCs", "ratio"))
    for i, curves in enumerate(summary.loading_curves):
        figures[f"pc{i + 1}_loadings_over_training"] = (
            f"Loading of every component on aligned PC{i + 1} over training.", curves_figure(
                summary.steps, curves, f"Aligned PC{i + 1} loadings over training",
                "loading"))
    figures["dataset_trajectory"] = ("Probe datasets' mean scores on each snapshot's "
                                     "aligned PC1 and PC2.", trajectory_figure(summary.series))
    for pcs in ((0, 1), (1, 2)) if summary.common is not None else ():
        for colour in ("step", "dataset"):
            name = f"tokens_pc{pcs[0] + 1}_pc{pcs[1] + 1}_by_{colour}"
            figures[name] = (
                f"Every probe token of every snapshot in one basis (a PCA of all "
                f"snapshots together), PC{pcs[0] + 1} vs PC{pcs[1] + 1}, coloured by "
                f"{colour}.", token_trajectory_figure(summary.common, summary.token_datasets,
                                                      pcs, colour))
    figures["llc"] = ("Refined LLC of every component and the LLC of the full model.",
                      curves_figure(summary.llc_steps, summary.llc_curves,
                                    "Learning coefficients over training", "(r)LLC"))
    return figures


def _header(title: str, summary: RunSummary) -> str:
    shown, results = summary.shown, summary.results
    config = ", ".join(f"{k}={v}" for k, v in shown.config.items()
                       if k in ("step_size", "n_beta", "gamma", "num_chains", "num_draws",
                                "batch_size", "seed"))
    failed = "".join(f"<li>{html.escape(n)}: {html.escape(r)}</li>"
                     for n, r in shown.failed.items())
    written = "".join(f"<li>{html.escape(line)}</li>" for line in written_summary(summary))
    return (f"<h1>{html.escape(title)}</h1><h2>Summary</h2><ul>{written}</ul>"
            f"<p>{len(results)} snapshot(s) at steps "
            f"{[r.step for r in results]}; token view: step {shown.step}. Standardization: "
            f"<b>{html.escape(summary.standardization)}</b>. SGLD: {html.escape(config)}.</p>"
            + (f"<p>Failed components at this step:</p><ul>{failed}</ul>" if failed else ""))


def _top_tokens_table(result: SusceptibilityResult, texts: list[list[str]], k: int) -> str:
    rows = []
    for row, name in enumerate(result.component_names):
        cells = []
        for indices in extreme_tokens(result, row, k):
            items = []
            for i in indices:
                s, t = int(result.token_sequence[i]), int(result.token_position[i])
                context = "".join(texts[s][max(0, t - 5):t + 1])
                token = html.escape(texts[s][t + 1] if t + 1 < len(texts[s]) else f"#{t}")
                items.append(f"<code>{html.escape(context)}</code><b>[{token}]</b> "
                             f"{result.chi[row, i]:+.3g}")
            cells.append("<br>".join(items) or "(failed)")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{cells[0]}</td><td>{cells[1]}</td>"
                    "</tr>")
    return ("<h2>Tokens each component expresses and suppresses</h2><table><tr><th>component"
            "</th><th>expresses (most negative)</th><th>suppresses (most positive)</th></tr>"
            + "".join(rows) + "</table>")
