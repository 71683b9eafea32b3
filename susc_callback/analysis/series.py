"""A run's snapshots in step order, their PCs followed over time."""

from __future__ import annotations

import numpy as np

from susc_callback.analysis.pca import Standardization, SusceptibilityPCA, pca_or_none
from susc_callback.estimator.results import SusceptibilityResult


class SnapshotSeries:
    """Per-snapshot PCA, each aligned (sign and order) to the previous snapshot's, so that
    PC loadings and the probe datasets' scores can be followed as curves over training."""

    def __init__(self, n_pcs: int = 3,
                 standardization: Standardization = "structural-inference") -> None:
        self.n_pcs, self.standardization = n_pcs, standardization
        self.pcas: dict[int, SusceptibilityPCA] = {}

    def add(self, result: SusceptibilityResult) -> SusceptibilityPCA | None:
        """Fit the PCA of ``result`` (its ``step`` must be set and later than any added).
        None, and nothing added, when no PCs exist: fewer than 2 components are finite, or
        the matrix is constant (warned)."""
        if result.step is None:
            raise ValueError("A result needs its training step to join a series")
        if self.pcas and result.step <= max(self.pcas):
            raise ValueError(f"Snapshot at step {result.step} is not after the last one "
                             f"(step {max(self.pcas)})")
        if result.finite_components.sum() < 2:
            return None
        pca = pca_or_none(result, self.n_pcs, self.standardization)
        if pca is None:
            return None
        if self.pcas:
            pca.align_to(self.pcas[max(self.pcas)])
        self.pcas[result.step] = pca
        return pca

    def dataset_trajectories(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(steps (S,), dataset names (D), scores (S, D, n_pcs))``: each probe dataset's
        mean token score on the aligned PCs at every snapshot (NaN where a snapshot has
        fewer PCs or lacks the dataset)."""
        steps = np.array(sorted(self.pcas), dtype=np.int64)
        names = list(dict.fromkeys(n for p in self.pcas.values() for n in p.dataset_names_))
        scores = np.full((len(steps), len(names), self.n_pcs), np.nan)
        for i, step in enumerate(steps):
            pca = self.pcas[int(step)]
            for d, name in enumerate(pca.dataset_names_):
                k = pca.dataset_scores_.shape[1]
                scores[i, names.index(name), :k] = pca.dataset_scores_[d]
        return steps, names, scores

    def loading_curves(self, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(steps (S,), {component: (S,)})``: every component's loading on aligned PC
        ``k`` (from 0) at every snapshot; NaN where a snapshot lacks it."""
        steps = np.array(sorted(self.pcas), dtype=np.int64)
        pcas = [self.pcas[int(step)] for step in steps]
        names = list(dict.fromkeys(n for p in pcas for n in p.component_names_))
        curves = {}
        for name in names:
            curves[name] = np.array([
                p.loadings_[k, p.component_names_.index(name)]
                if name in p.component_names_ and k < len(p.loadings_) else np.nan
                for p in pcas])
        return steps, curves
