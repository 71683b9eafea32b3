"""A few sentences that say what a run's snapshots show, with numbers and their
uncertainty, for the top of the report."""

from __future__ import annotations

import numpy as np

from susc_callback.analysis.pca import SusceptibilityPCA, layer_pcas
from susc_callback.analysis.run_summary import RunSummary
from susc_callback.estimator.results import SusceptibilityResult


def written_summary(summary: RunSummary) -> list[str]:
    """Sentences about the shown snapshot and the series, each a plain-text paragraph."""
    shown = summary.shown
    steps = [r.step for r in summary.results if r.step is not None]
    lines = [f"{len(summary.results)} snapshot(s)"
             + (f" from step {min(steps)} to step {max(steps)}" if steps else "")
             + f"; in detail below: step {shown.step}."]
    for layer, pca in layer_pcas(shown, 2, summary.standardization).items():
        parts = [f"PC{k + 1} {100 * pca.explained_variance_ratio_[k]:.1f} % "
                 f"({_leading(pca, k)})" for k in range(len(pca.loadings_))]
        lines.append(f"Layer {layer or '(other components)'}: a PCA of its "
                     f"{len(pca.component_names_)} components gives " + ", ".join(parts) + ".")
    lines.append(_rllc_sentence(shown))
    if shown.failed:
        lines.append(f"Failed (diverged) at this step: {', '.join(sorted(shown.failed))}.")
    return lines


def _leading(pca: SusceptibilityPCA, k: int) -> str:
    """The components with the largest |loading| on PC ``k``, with their loadings."""
    order = np.argsort(-np.abs(pca.loadings_[k]))[:3]
    return ", ".join(f"{pca.component_names_[i]} {pca.loadings_[k, i]:+.2f}" for i in order)


def _rllc_sentence(result: SusceptibilityResult) -> str:
    """rLLC range with its standard errors (older results without them: the chains'
    spread of E_C[phi]; with one chain no error can be given)."""
    finite = np.flatnonzero(np.isfinite(result.rllc))
    if not len(finite):
        return "No component has a finite rLLC at this step."
    low, high = finite[np.argmin(result.rllc[finite])], finite[np.argmax(result.rllc[finite])]
    chains = result.loss_traces.shape[1]
    if result.rllc_se is not None:
        error = result.rllc_se
        uncertainty = f" (± standard error {error[low]:.2g} and {error[high]:.2g})"
    elif chains > 1:
        phi = result.loss_traces - result.anchor_loss[:, None, None]
        n_beta = result.config.get("n_beta", np.nan)
        error = n_beta * np.nanstd(np.nanmean(phi, axis=2), axis=1, ddof=1) / np.sqrt(chains)
        uncertainty = (f" (± between-chain standard error, {chains} chains: "
                       f"{error[low]:.2g} and {error[high]:.2g})")
    else:
        uncertainty = " (one chain: no between-chain error; use 2 or more chains for one)"
    return (f"rLLC from {result.rllc[low]:.3g} ({result.component_names[low]}) to "
            f"{result.rllc[high]:.3g} ({result.component_names[high]}){uncertainty}; the full "
            f"model's LLC {result.llc_full:.3g}. Per-token values of one estimate are noisy: "
            "compare two seeds with `susc compare` before reading single tokens.")
