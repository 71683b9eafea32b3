"""Are the clusters real? Agreement of the clusterings of two independent estimates (two
seeds) of the same checkpoint: the adjusted Rand index over the shared probe tokens (about
0 for structure that is noise, 1 for the same partition), and for each cluster of the
first its best Jaccard overlap with a cluster of the second."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import adjusted_rand_score

from susc_callback.clusters.clustering import TokenClusters
from susc_callback.estimator.results import SusceptibilityResult


@dataclass
class ClusterAgreement:
    """``ari`` of the two clusterings; ``best_jaccard`` ``(K,)`` and ``sizes`` ``(K,)`` of
    the first estimate's clusters."""

    ari: float
    best_jaccard: np.ndarray
    sizes: np.ndarray


def cluster_agreement(first: SusceptibilityResult, second: SusceptibilityResult,
                      **options) -> ClusterAgreement:
    """Cluster both estimates alike (``options``: of :class:`TokenClusters`) and compare.
    Where the first clustering chose its number of clusters (graph, no ``n_clusters``), the
    second gets the same number: the comparison is of the partitions, not of two eigengap
    choices (which one noisy eigenvalue can move)."""
    if not (np.array_equal(first.probe_input_ids, second.probe_input_ids)
            and np.array_equal(first.token_sequence, second.token_sequence)):
        raise ValueError("The two estimates were computed on different probe tokens: their "
                         "clusterings cannot be compared token by token")
    fit = TokenClusters(**options).fit(first)
    if fit.method == "graph" and fit.n_clusters is None:
        options = {**options, "n_clusters": max(2, fit.n_clusters_)}
    a, b = fit.labels_, TokenClusters(**options).fit(second).labels_
    clusters = sorted(set(a.tolist()) - {-1})
    best = np.array([max(((a == k) & (b == other)).sum() / ((a == k) | (b == other)).sum()
                         for other in set(b.tolist()) - {-1}) for k in clusters])
    return ClusterAgreement(float(adjusted_rand_score(a, b)), best,
                            np.array([(a == k).sum() for k in clusters]))
