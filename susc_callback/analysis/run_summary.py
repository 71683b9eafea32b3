"""Everything a view of one run shows, computed once: the views (the HTML report) only
draw what is here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from susc_callback.analysis.pca import (
    CommonBasisPCA,
    Standardization,
    SusceptibilityPCA,
    pca_or_none,
)
from susc_callback.analysis.series import SnapshotSeries
from susc_callback.estimator.results import SusceptibilityResult


@dataclass
class RunSummary:
    """The analysis of a run's snapshots, with one snapshot (``shown``) in detail.

    Attributes:
        results: the snapshots in step order (a result without a step first).
        shown: the snapshot of the token view.
        standardization: of every matrix below.
        shown_pca: the PCA of ``shown``, None with fewer than 2 finite components.
        series: PCs of the timed snapshots, aligned across them (None with fewer than 2).
        steps: ``(S,)`` steps of ``series``.
        explained_variance: ``{"PC1": (S,), ...}`` over ``steps``.
        loading_curves: per PC (the first two), ``{component: (S,)}`` over ``steps``.
        common: one PCA of all timed snapshots (None without 2 components finite in
            every snapshot).
        token_datasets: per timed snapshot, the dataset of each token (for ``common``).
        llc_steps, llc_curves: rLLC of every component and the full LLC over training.
    """

    results: list[SusceptibilityResult]
    shown: SusceptibilityResult
    standardization: Standardization
    shown_pca: SusceptibilityPCA | None = None
    series: SnapshotSeries | None = None
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    explained_variance: dict[str, np.ndarray] = field(default_factory=dict)
    loading_curves: list[dict[str, np.ndarray]] = field(default_factory=list)
    common: CommonBasisPCA | None = None
    token_datasets: list[np.ndarray] = field(default_factory=list)
    llc_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    llc_curves: dict[str, np.ndarray] = field(default_factory=dict)


def summarize_run(results: list[SusceptibilityResult], *, step: int | None = None,
                  n_pcs: int = 3, standardization: Standardization = "structural-inference"
                  ) -> RunSummary:
    """Analyse ``results`` (one run's snapshots, any order), showing snapshot ``step``
    (default the latest) in detail."""
    if not results:
        raise ValueError("No results to report")
    results = sorted(results, key=lambda r: -1 if r.step is None else r.step)
    shown = results[-1] if step is None else next((r for r in results if r.step == step), None)
    if shown is None:
        raise ValueError(f"No snapshot at step {step}; available steps: "
                         f"{[r.step for r in results]}")
    summary = RunSummary(results, shown, standardization)
    if shown.finite_components.sum() >= 2:
        summary.shown_pca = pca_or_none(shown, n_pcs, standardization)
    timed = [r for r in results if r.step is not None and r.finite_components.sum() >= 2]
    if len(timed) >= 2:
        _add_trajectories(summary, timed, n_pcs, standardization)
    return summary


def _add_trajectories(summary: RunSummary, timed: list[SusceptibilityResult], n_pcs: int,
                      standardization: Standardization) -> None:
    series = SnapshotSeries(n_pcs, standardization)
    for result in timed:
        series.add(result)
    if not series.pcas:
        return
    steps = np.array(sorted(series.pcas))
    pcas = [series.pcas[s] for s in steps]
    k = min(len(p.explained_variance_ratio_) for p in pcas)
    summary.series, summary.steps = series, steps
    summary.explained_variance = {
        f"aligned PC{i + 1}": np.array([p.explained_variance_ratio_[i] for p in pcas])
        for i in range(k)}
    summary.loading_curves = [series.loading_curves(i)[1] for i in range(min(k, 2))]
    try:
        summary.common = CommonBasisPCA(n_pcs, standardization).fit(timed)
    except ValueError:  # < 2 components finite in every snapshot: no common basis
        summary.common = None
    summary.token_datasets = [r.token_dataset for r in timed]
    summary.llc_steps = np.array([r.step for r in timed])
    summary.llc_curves = {
        **{n: np.array([_row(r, "rllc", n) for r in timed]) for n in timed[-1].component_names},
        "full model": np.array([r.llc_full for r in timed])}


def _row(result: SusceptibilityResult, field_name: str, name: str) -> float:
    if name not in result.component_names:
        return np.nan
    return float(getattr(result, field_name)[result.component_names.index(name)])
