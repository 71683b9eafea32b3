"""How much of the structure in one estimate is signal: split-half reliability and the
significance of a principal component's separation of a group of components.

* :func:`split_half_reliability`: every result keeps ``chi`` from each half of its chains
  (``chi_halves``). Two halves that agree token by token, and whose PCs load the
  components alike, say the estimate is reliable; the Spearman-Brown formula turns a
  half-to-half correlation ``r`` into that of two whole estimates, ``2r / (1 + r)``.
* :func:`margin_significance`: the *separation margin* of a group on a PC is the smallest
  loading of the group minus the largest of the rest, the PC oriented so that the group
  loads higher; positive means the PC alone tells the group apart. With few components a
  top PC puts some group of that size apart by chance fairly often, so the margin comes
  with a permutation p-value: how often a random group of the same size is separated at
  least as well (on the same PC, or on the best of the top PCs when none is named), and
  with the margins the two halves give on their own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from susc_callback.analysis.pca import (
    ConstantMatrixError,
    Standardization,
    SusceptibilityPCA,
    standardize,
)
from susc_callback.estimator.results import SusceptibilityResult


@dataclass(frozen=True)
class SplitHalf:
    """Agreement of the two halves of one estimate.

    Attributes:
        component_names: the components compared (finite in both halves).
        component_r: ``(C,)`` correlation over probe tokens of each component's two rows.
        matrix_r: correlation of the two standardized matrices, all entries.
        loadings_r: ``(k,)`` absolute correlation of each PC's loadings in the two halves
            (the second half's PCs matched to the first's).
    """

    component_names: list[str]
    component_r: np.ndarray
    matrix_r: float
    loadings_r: np.ndarray

    @property
    def whole_estimate_r(self) -> np.ndarray:
        """Spearman-Brown: the correlation two whole estimates would have, per component."""
        return spearman_brown(self.component_r)


def split_half_or_none(result: SusceptibilityResult, pca: SusceptibilityPCA | None
                       ) -> SplitHalf | None:
    """:func:`split_half_reliability` with ``pca``'s settings, or None where there is
    none: no half estimates, fewer than 2 finite components, or constant halves."""
    if result.chi_halves is None:
        return None
    settings = {} if pca is None else {"n_components": pca.n_components,
                                       "standardization": pca.standardization}
    try:
        return split_half_reliability(result, **settings)
    except ValueError:
        return None


def spearman_brown(r: np.ndarray | float) -> np.ndarray:
    """The correlation of two estimates twice as long as two with correlation ``r``."""
    r = np.asarray(r, dtype=np.float64)
    return 2 * r / (1 + r)


def _halves(result: SusceptibilityResult) -> tuple[SusceptibilityResult, SusceptibilityResult]:
    if result.chi_halves is None:
        raise ValueError("This result has no half estimates (chi_halves); it was saved by an "
                         "older version: estimate it again for split-half reliability")
    first, second = (replace(result, chi=half) for half in result.chi_halves)
    keep = first.finite_components & second.finite_components
    names = [n for n, k in zip(result.component_names, keep) if k]
    if len(names) < 2:
        raise ValueError(f"Split-half reliability needs >= 2 components with finite halves, "
                         f"got {len(names)}")
    return first.subset(names), second.subset(names)


def split_half_reliability(result: SusceptibilityResult, n_components: int = 3,
                           standardization: Standardization = "structural-inference"
                           ) -> SplitHalf:
    """The agreement of the halves of ``result`` (per component, whole matrix, PCs)."""
    first, second = _halves(result)
    rows = np.array([_correlation(a, b) for a, b in zip(first.chi, second.chi)])
    a, b = (standardize(half.chi, standardization) for half in (first, second))
    pca_a = SusceptibilityPCA(n_components, standardization).fit(first)
    pca_b = SusceptibilityPCA(n_components, standardization).fit(second).align_to(pca_a)
    loadings = np.array([abs(_correlation(x, y))
                         for x, y in zip(pca_a.loadings_, pca_b.loadings_)])
    return SplitHalf(first.component_names, rows, _correlation(a.ravel(), b.ravel()),
                     loadings)


def loading_errors(result: SusceptibilityResult, pca: SusceptibilityPCA) -> np.ndarray | None:
    """``(k, C)``: a standard error of each of ``pca``'s loadings (on its components),
    ``|a - b| / 2`` from the loadings ``a``, ``b`` of the two halves' PCAs matched to
    ``pca`` (the variance of a whole estimate is a quarter of that of the halves'
    difference): one degree of freedom per entry, a rough bar. None without half
    estimates, or when a half lacks one of ``pca``'s components or has no PCs."""
    if result.chi_halves is None:
        return None
    halves = [replace(result, chi=half).subset(pca.component_names_)
              for half in result.chi_halves]
    if not all(half.finite_components.all() for half in halves):
        return None
    try:
        a, b = (SusceptibilityPCA(len(pca.loadings_), pca.standardization).fit(half)
                .align_to(pca) for half in halves)
    except ConstantMatrixError:  # e.g. a half of one chain's draws that holds only w*
        return None
    return np.abs(a.loadings_ - b.loadings_) / 2


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def separation_margin(loadings: np.ndarray, names: list[str], group: set[str]) -> float:
    """``min(group) - max(rest)`` of one PC's loadings, oriented so that the group's mean
    loading is the higher (NaN if either side is empty)."""
    inside = np.array([n in group for n in names])
    if inside.all() or not inside.any():
        return float("nan")
    oriented = loadings if loadings[inside].mean() >= loadings[~inside].mean() else -loadings
    return float(oriented[inside].min() - oriented[~inside].max())


@dataclass(frozen=True)
class MarginTest:
    """A group's separation margin on a PC and how often chance does as well.

    Attributes:
        pc: the PC (0-based) the margin is on: the one named, or the group's best.
        margin: the group's separation margin on it.
        p_value: the share of random groups of the same size (all of them when there are
            at most ``permutations``) whose margin is at least ``margin``; the observed
            group counts as one of them, so the smallest possible value is 1 / (N + 1).
        null_margins: the random groups' margins.
        half_margins: the margin on the same PC in each half of the estimate (PCs of each
            half matched to the whole estimate's); None without half estimates.
    """

    pc: int
    margin: float
    p_value: float
    null_margins: np.ndarray
    half_margins: tuple[float, float] | None


def margin_significance(result: SusceptibilityResult, group: set[str] | list[str],
                        pc: int | None = None, n_components: int = 3,
                        permutations: int = 2000, seed: int = 0,
                        standardization: Standardization = "structural-inference"
                        ) -> MarginTest:
    """Test whether PC ``pc`` (0-based; None: the best of the top ``n_components``)
    separates ``group`` from the other components more than a random group would."""
    pca = SusceptibilityPCA(n_components, standardization).fit(result)
    names, group = pca.component_names_, set(group)
    unknown = sorted(group - set(result.component_names))
    if unknown:
        raise ValueError(f"Unknown components {unknown} in group; have "
                         f"{result.component_names}")
    size = len(group & set(names))
    if not 0 < size < len(names):
        raise ValueError(f"The group must hold some but not all of the {len(names)} "
                         f"components with finite susceptibilities; it holds {size}")
    pcs = range(len(pca.loadings_)) if pc is None else [_check_pc(pc, len(pca.loadings_))]

    def best(members: set[str]) -> tuple[float, int]:
        return max((separation_margin(pca.loadings_[k], names, members), k) for k in pcs)

    margin, chosen = best(group)
    null = np.array([best({names[i] for i in members})[0]
                     for members in _random_groups(len(names), size, permutations, seed)])
    p_value = (1 + np.sum(null >= margin - 1e-12)) / (1 + len(null))
    return MarginTest(chosen, margin, float(p_value), null,
                      _half_margins(result, pca, chosen, group, standardization))


def _check_pc(pc: int, count: int) -> int:
    if not 0 <= pc < count:
        raise ValueError(f"Invalid pc: {pc} (the PCA has PCs 0..{count - 1})")
    return pc


def _random_groups(count: int, size: int, permutations: int, seed: int):
    """Every group of ``size`` of ``count`` when there are at most ``permutations``; else
    ``permutations`` random ones."""
    if math.comb(count, size) <= permutations:
        yield from itertools.combinations(range(count), size)
        return
    rng = np.random.default_rng(seed)
    for _ in range(permutations):
        yield rng.choice(count, size, replace=False)


def _half_margins(result: SusceptibilityResult, pca: SusceptibilityPCA, pc: int,
                  group: set[str], standardization: Standardization
                  ) -> tuple[float, float] | None:
    if result.chi_halves is None:
        return None
    margins = []
    for half in _halves(result):
        fitted = SusceptibilityPCA(len(pca.loadings_), standardization).fit(half)
        fitted.align_to(pca)
        margins.append(separation_margin(fitted.loadings_[pc], fitted.component_names_,
                                         group))
    return margins[0], margins[1]
