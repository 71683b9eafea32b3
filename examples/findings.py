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
from susc_callback.analysis.reliability import separation_margin


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


def cluster_findings(results: list[SusceptibilityResult],
                     second_estimate: SusceptibilityResult) -> dict:
    """The token clusters of the series (``susc_callback.clusters``): at the last snapshot,
    every cluster's size and main pattern labels; the cluster that holds most of the
    induction-labelled tokens, its purity and the first snapshot where it had formed (best
    Jaccard overlap >= 0.5 with a cluster of that snapshot); and the agreement (ARI) of the
    last snapshot's clustering with that of ``second_estimate`` (another seed, same
    checkpoint), cluster by cluster."""
    from susc_callback.clusters.snapshot import cluster_series
    from susc_callback.clusters.stability import cluster_agreement

    series = cluster_series(results)
    last = series.snapshots[-1]
    fit = last.clusters
    clusters = []
    for k in range(fit.n_clusters_):
        counts = dict(zip(fit.pattern_names_, fit.pattern_counts_[k].tolist()))
        top = sorted(counts.items(), key=lambda item: -item[1])[:3]
        clusters.append({"cluster": k, "size": int(fit.sizes_[k]),
                         "patterns": {n: round(c / fit.sizes_[k], 3) for n, c in top if c}})
    induction = last.patterns == "induction"
    holder = int(np.argmax([(fit.labels_[induction] == k).sum()
                            for k in range(fit.n_clusters_)]))
    members = fit.labels_ == holder
    steps = [s.step for s in series.snapshots]
    emerged = None if series.emergence is None else next(
        (step for step, value in zip(steps, series.emergence[holder]) if value >= 0.5), None)
    agreement = cluster_agreement(results[-1], second_estimate)
    return {"step": results[-1].step, "count": fit.n_clusters_, "clusters": clusters,
            "induction_tokens": int(induction.sum()),
            "induction_cluster": {
                "cluster": holder, "size": int(members.sum()),
                "share_of_induction_tokens": round(float(members[induction].mean()), 3),
                "purity": round(float(induction[members].mean()), 3),
                "first_formed_at_step": emerged,
                "emergence": None if series.emergence is None else
                dict(zip(steps, np.round(series.emergence[holder], 3).tolist()))},
            "stability": {"ari": round(agreement.ari, 3),
                          "best_jaccard": np.round(agreement.best_jaccard, 3).tolist(),
                          "stable_clusters": int((agreement.best_jaccard >= 0.5).sum())}}
