"""Standardization, principal components and PC alignment across checkpoints.

The matrix analysed is ``X = chi.T`` (tokens x components).
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA

from susc_callback.components.architectures import group_by_layer
from susc_callback.estimator.results import SusceptibilityResult, mean_per_dataset

Standardization = Literal["structural-inference", "spectroscopy", "none"]
STANDARDIZATIONS: tuple[str, ...] = get_args(Standardization)


def standardize(chi: np.ndarray, mode: Standardization = "structural-inference") -> np.ndarray:
    """Tokens x components matrix from ``chi`` (components x tokens).

    "structural-inference": centre each component over tokens. "spectroscopy": z-score each
    component over tokens (removing its unknown overall scale), then centre each token over
    components. "none": the raw transpose.
    """
    if mode not in STANDARDIZATIONS:
        raise ValueError(f"Invalid standardization {mode!r}; valid: {', '.join(STANDARDIZATIONS)}")
    x = np.asarray(chi, dtype=np.float64).T
    if mode == "none":
        return x.copy()
    x = x - x.mean(axis=0, keepdims=True)
    if mode == "spectroscopy":
        std = x.std(axis=0, keepdims=True)
        x = np.divide(x, std, out=np.zeros_like(x), where=std > 0)
        x = x - x.mean(axis=1, keepdims=True)
    return x


class ConstantMatrixError(ValueError):
    """The standardized susceptibility matrix does not vary: it has no principal
    components (explained-variance ratios would be 0 / 0)."""


def _check_varies(x: np.ndarray) -> None:
    if not np.any(x - x.mean(axis=0)):
        raise ConstantMatrixError(
            f"The standardized susceptibility matrix ({x.shape[0]} tokens x {x.shape[1]} "
            "components) is constant, so it has no principal components; an estimate whose "
            "chi is all zero usually had too few draws away from w* (raise num_draws or "
            "num_burnin)")


class _PCABase:
    """Parameters shared by the PCAs of this module (scikit-learn style: ``__init__`` only
    stores them; ``fit`` validates, computes and returns ``self``)."""

    def __init__(self, n_components: int = 3,
                 standardization: Standardization = "structural-inference") -> None:
        self.n_components = n_components
        self.standardization = standardization


def _dataset_means(token_scores: np.ndarray, result: SusceptibilityResult) -> np.ndarray:
    """``(D, k)``: the mean token score of each of ``result``'s probe datasets."""
    return mean_per_dataset(token_scores.T, result.token_dataset,
                            len(result.dataset_names)).T


class SusceptibilityPCA(_PCABase):
    """PCA of a standardized susceptibility matrix.

    Learned attributes (after :meth:`fit`): ``component_names_`` (components used: failed,
    NaN components are left out), ``loadings_`` ``(n_pcs, C)``, ``token_scores_``
    ``(P, n_pcs)`` (= U S), ``explained_variance_ratio_`` ``(n_pcs,)``, and
    ``dataset_scores_`` ``(D, n_pcs)``, the mean token score of each probe dataset.
    Signs are deterministic (scikit-learn's ``svd_flip``); use :meth:`align_to` to follow
    PCs across checkpoints.
    """

    def fit(self, result: SusceptibilityResult) -> SusceptibilityPCA:
        keep = result.finite_components
        if keep.sum() < 2:
            raise ValueError(f"PCA needs >= 2 components with finite susceptibilities, got "
                             f"{int(keep.sum())}")
        x = standardize(result.chi[keep], self.standardization)
        _check_varies(x)
        n = min(self.n_components, *x.shape)
        if n < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")
        pca = PCA(n_components=n, svd_solver="full").fit(x)
        self.component_names_ = [name for name, k in zip(result.component_names, keep) if k]
        self.loadings_ = pca.components_
        self.token_scores_ = pca.transform(x)
        self.explained_variance_ratio_ = pca.explained_variance_ratio_
        self.dataset_names_ = list(result.dataset_names)
        self.dataset_scores_ = _dataset_means(self.token_scores_, result)
        return self

    def align_to(self, reference: SusceptibilityPCA) -> SusceptibilityPCA:
        """Reorder and flip this fit's PCs to best match ``reference``'s loadings (in place).

        The match uses the components both fits share, so a component that failed in one
        snapshot does not break the alignment of the others.
        """
        shared = [name for name in self.component_names_ if name in reference.component_names_]
        if not shared:
            raise ValueError("Cannot align PCs fitted on disjoint components: "
                             f"{self.component_names_} vs {reference.component_names_}")
        mine = [self.component_names_.index(name) for name in shared]
        theirs = [reference.component_names_.index(name) for name in shared]
        order, signs = align_loadings(self.loadings_[:, mine], reference.loadings_[:, theirs])
        self.loadings_ = self.loadings_[order] * signs[:, None]
        self.token_scores_ = self.token_scores_[:, order] * signs[None, :]
        self.dataset_scores_ = self.dataset_scores_[:, order] * signs[None, :]
        self.explained_variance_ratio_ = self.explained_variance_ratio_[order]
        return self


def pca_or_none(result: SusceptibilityResult, n_components: int,
                standardization: Standardization) -> SusceptibilityPCA | None:
    """The PCA of ``result``; None, with a warning naming the snapshot, when its matrix is
    constant and has no PCs."""
    try:
        return SusceptibilityPCA(n_components, standardization).fit(result)
    except ConstantMatrixError as error:
        warnings.warn(f"Snapshot at step {result.step} has no PCs: {error}", stacklevel=3)
        return None


def layer_pcas(result: SusceptibilityResult, n_components: int = 3,
               standardization: Standardization = "structural-inference"
               ) -> dict[str, SusceptibilityPCA]:
    """``{layer: PCA of that layer's components}`` (layers as in
    :func:`~susc_callback.components.architectures.layer_of`; the papers' findings are per
    layer), for every layer with at least 2 finite components and a matrix that varies."""
    finite = [n for n, keep in zip(result.component_names, result.finite_components) if keep]
    fits = {}
    for layer, rows in group_by_layer(finite).items():
        names = [finite[i] for i in rows]
        if len(names) >= 2:
            try:
                fits[layer] = SusceptibilityPCA(n_components, standardization).fit(
                    result.subset(names))
            except ConstantMatrixError:
                continue
    return fits


def align_loadings(loadings: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order and signs that match ``loadings`` (k, C) to ``reference`` (k', C).

    Returns ``(order, signs)`` with ``aligned = loadings[order] * signs[:, None]``: PC ``i`` of
    the aligned set is the one with the largest ``|cosine|`` to reference PC ``i`` (a
    one-to-one assignment); PCs beyond the reference keep their relative order.
    """
    reference = reference[:len(loadings)]
    tiny = np.finfo(np.float64).tiny  # a PC with no weight on the compared components
    a = loadings / np.maximum(np.linalg.norm(loadings, axis=1, keepdims=True), tiny)
    b = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), tiny)
    cosine = b @ a.T
    ref_rows, rows = linear_sum_assignment(-np.abs(cosine))
    order = np.empty(len(ref_rows), dtype=np.int64)
    order[ref_rows] = rows
    rest = [i for i in range(len(a)) if i not in set(rows)]
    order = np.concatenate([order, np.array(rest, dtype=np.int64)])
    signs = np.ones(len(order))
    matched = len(ref_rows)
    signs[:matched] = np.where(cosine[np.arange(matched), order[:matched]] < 0, -1.0, 1.0)
    return order, signs


class CommonBasisPCA(_PCABase):
    """One PCA of several snapshots' standardized matrices stacked (every snapshot's tokens
    are samples), so that all snapshots are projected into the same basis and token and
    dataset trajectories across training can be drawn in one plane.

    Learned attributes: ``component_names_`` (components finite in every snapshot),
    ``steps_``, ``loadings_`` ``(n_pcs, C)``, ``explained_variance_ratio_``,
    ``token_scores_`` (one ``(P, n_pcs)`` array per snapshot), ``dataset_names_`` and
    ``dataset_scores_`` ``(snapshots, D, n_pcs)``.
    """

    def fit(self, results: list[SusceptibilityResult]) -> CommonBasisPCA:
        if not results:
            raise ValueError("CommonBasisPCA needs at least one result")
        names = [n for n in results[0].component_names
                 if all(n in r.component_names and
                        r.finite_components[r.component_names.index(n)] for r in results)]
        if len(names) < 2:
            raise ValueError(f"A common basis needs >= 2 components finite in every snapshot, "
                             f"got {names}")
        blocks = [standardize(r.chi[[r.component_names.index(n) for n in names]],
                              self.standardization) for r in results]
        _check_varies(np.vstack(blocks))
        n = min(self.n_components, len(names), sum(len(b) for b in blocks))
        pca = PCA(n_components=n, svd_solver="full").fit(np.vstack(blocks))
        self.component_names_ = names
        self.steps_ = [r.step for r in results]
        self.loadings_ = pca.components_
        self.explained_variance_ratio_ = pca.explained_variance_ratio_
        self.token_scores_ = [pca.transform(b) for b in blocks]
        self.dataset_names_ = list(dict.fromkeys(d for r in results for d in r.dataset_names))
        self.dataset_scores_ = np.full((len(results), len(self.dataset_names_), n), np.nan)
        for i, (result, scores) in enumerate(zip(results, self.token_scores_)):
            rows = [self.dataset_names_.index(name) for name in result.dataset_names]
            self.dataset_scores_[i, rows] = _dataset_means(scores, result)
        return self
