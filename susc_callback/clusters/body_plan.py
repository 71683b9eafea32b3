"""The developmental body plan: the per-token vectors of every snapshot of a series in one
2-D space, and how clusters form and move over training (the embryology paper's view).

All snapshots of a series share their probe, so token ``p`` is the same token at every
step. The standardized vectors of all snapshots (components finite in every one) are
stacked and embedded together: with UMAP where ``umap-learn`` is installed (the
``clusters`` extra), fitted on at most ``max_fit_points`` of them and applied to all, else
with a PCA (exact, linear, no extra). Each snapshot is then one panel of the same plane.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import torch
from sklearn.decomposition import PCA

from susc_callback.analysis.pca import Standardization, standardize
from susc_callback.estimator.results import SusceptibilityResult

EmbeddingMethod = Literal["auto", "umap", "pca"]


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


class BodyPlan:
    """A 2-D embedding of every snapshot's per-token vectors in one common space.

    Learned attributes: ``method_`` ("umap" or "pca"), ``steps_``, ``component_names_``,
    ``embedding_`` (one ``(P, 2)`` array per snapshot) and, with ``labels`` given to
    :meth:`fit` (e.g. the last snapshot's clusters), ``tracks_`` ``(K, snapshots, 2)``:
    the mean position of each cluster's tokens at every snapshot.
    """

    def __init__(self, method: EmbeddingMethod = "auto",
                 standardization: Standardization = "spectroscopy",
                 max_fit_points: int = 20000, random_state: int = 0) -> None:
        self.method, self.standardization = method, standardization
        self.max_fit_points, self.random_state = max_fit_points, random_state

    def fit(self, results: list[SusceptibilityResult], labels: np.ndarray | None = None
            ) -> BodyPlan:
        if not results:
            raise ValueError("BodyPlan needs at least one snapshot")
        if self.method not in ("auto", "umap", "pca"):
            raise ValueError(f"method must be 'auto', 'umap' or 'pca', got {self.method!r}")
        if self.method == "umap" and not umap_available():
            raise ValueError("method='umap' needs umap-learn: pip install "
                             "'susc-callback[clusters]' (or use method='auto' for PCA)")
        sizes = {r.chi.shape[1] for r in results}
        if len(sizes) > 1:
            raise ValueError(f"The snapshots have different probe sizes {sorted(sizes)}: one "
                             "series shares its probe")
        names = [n for n in results[0].component_names
                 if all(n in r.component_names
                        and r.finite_components[r.component_names.index(n)] for r in results)]
        if len(names) < 2:
            raise ValueError(f"A body plan needs >= 2 components finite in every snapshot, got "
                             f"{names}")
        blocks = [standardize(r.chi[[r.component_names.index(n) for n in names]],
                              self.standardization) for r in results]
        stacked = np.vstack(blocks)
        self.method_ = "umap" if self.method == "umap" or (
            self.method == "auto" and umap_available()) else "pca"
        points = self._embed(stacked)
        self.component_names_, self.steps_ = names, [r.step for r in results]
        self.embedding_ = np.split(points, len(results))
        if labels is not None:
            clusters = sorted(set(labels.tolist()) - {-1})
            self.tracks_ = np.stack([[e[labels == k].mean(0) for e in self.embedding_]
                                     for k in clusters])
        return self

    def _embed(self, x: np.ndarray) -> np.ndarray:
        if self.method_ == "pca":
            return PCA(2, random_state=self.random_state).fit_transform(x)
        import umap

        rng = np.random.default_rng(self.random_state)
        fit_rows = rng.choice(len(x), min(len(x), self.max_fit_points), replace=False)
        threads = torch.get_num_threads()  # UMAP's numba resets torch's thread count
        try:
            reducer = umap.UMAP(n_components=2, random_state=self.random_state, n_jobs=1
                                ).fit(x[fit_rows])
            return reducer.transform(x)
        finally:
            torch.set_num_threads(threads)


def cluster_emergence(final: np.ndarray, per_snapshot: list[np.ndarray]) -> np.ndarray:
    """``(K, snapshots)``: for each cluster of the final clustering, the best Jaccard
    overlap of its tokens with a cluster of each snapshot's own clustering (1: the same
    tokens already formed one cluster; near 0: not yet). The first snapshot where it
    passes a half says when the cluster appeared."""
    clusters = sorted(set(final.tolist()) - {-1})
    overlap = np.zeros((len(clusters), len(per_snapshot)))
    for i, k in enumerate(clusters):
        members = final == k
        for j, labels in enumerate(per_snapshot):
            best = 0.0
            for other in set(labels[members].tolist()) - {-1}:
                theirs = labels == other
                best = max(best, (members & theirs).sum() / (members | theirs).sum())
            overlap[i, j] = best
    return overlap
