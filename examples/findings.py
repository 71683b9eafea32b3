"""Does a principal component of the susceptibilities single out the induction circuit?

Given a run's saved snapshots and the heads' attention scores (``head_scores.py``), for
each snapshot and each of the top PCs (whole model and per layer, structural-inference
standardization) this measures how well the PC's loadings separate a group of heads (e.g.
the induction heads) from the others: the *separation margin* is the smallest loading of
the group minus the largest loading of the rest, after orienting the PC so that the group
loads positively. A positive margin means the PC alone tells the group apart.
"""

from __future__ import annotations

import numpy as np

from susc_callback import SusceptibilityPCA, SusceptibilityResult
from susc_callback.analysis.pca import Standardization


def separation_margin(loadings: np.ndarray, names: list[str], group: set[str]) -> float:
    """``min(group) - max(rest)`` of sign-oriented loadings (NaN if either side is empty)."""
    inside = np.array([n in group for n in names])
    if inside.all() or not inside.any():
        return float("nan")
    oriented = loadings if loadings[inside].mean() >= loadings[~inside].mean() else -loadings
    return float(oriented[inside].min() - oriented[~inside].max())


def layer_of(name: str) -> int:
    """``"l1h3"`` -> 1."""
    return int(name[1:name.index("h")])


def restrict(result: SusceptibilityResult, layer: int) -> SusceptibilityResult:
    """The result with only the heads of one layer (for per-layer PCA, as in the paper)."""
    return result.subset([n for n in result.component_names if layer_of(n) == layer])


def pc_separation(result: SusceptibilityResult, group: set[str], n_pcs: int = 3,
                  layer: int | None = None,
                  standardization: Standardization = "structural-inference") -> list[dict]:
    """Per top PC: explained variance, the group's margin, and the loadings."""
    subset = result if layer is None else restrict(result, layer)
    pca = SusceptibilityPCA(n_pcs, standardization).fit(subset)
    names = pca.component_names_
    in_scope = group & set(names)
    return [{"pc": k + 1, "explained_variance": float(pca.explained_variance_ratio_[k]),
             "margin": separation_margin(pca.loadings_[k], names, in_scope),
             "loadings": dict(zip(names, np.round(pca.loadings_[k], 4).tolist()))}
            for k in range(len(pca.loadings_))]


def tag_scores(result: SusceptibilityResult, tags: list[str], n_pcs: int = 3
               ) -> dict[str, list[float]]:
    """Mean token score on each top PC (whole model) per pattern tag; ``tags`` has one
    entry per probe token."""
    pca = SusceptibilityPCA(n_pcs, "structural-inference").fit(result)
    tags_array = np.array(tags)
    return {tag: np.round(pca.token_scores_[tags_array == tag].mean(axis=0), 5).tolist()
            for tag in dict.fromkeys(tags) if (tags_array == tag).any()}
