"""One snapshot's token patterns and clusters, and a series' clusters and body plan: what
TensorBoard (through the snapshot publisher, for the callback and ``susc analyze`` alike)
and the HTML report show, computed by this one path."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from susc_callback.clusters.body_plan import BodyPlan, cluster_emergence
from susc_callback.clusters.clustering import TokenClusters
from susc_callback.clusters.patterns import result_patterns
from susc_callback.estimator.results import SusceptibilityResult


@dataclass
class SnapshotClusters:
    """The pattern label of every probe token and, where the snapshot can be clustered,
    its :class:`TokenClusters` (None, with ``reason``, where it cannot)."""

    step: int | None
    patterns: np.ndarray
    clusters: TokenClusters | None
    reason: str | None = None

    def scalars(self) -> dict[str, float]:
        """``clusters/count``, ``clusters/largest_share``, ``clusters/median_share``,
        ``clusters/unclustered_share`` and ``clusters/induction_purity`` (the largest share
        of the induction-labelled tokens that one cluster holds)."""
        if self.clusters is None:
            return {}
        fit, total = self.clusters, len(self.patterns)
        scalars = {"clusters/count": float(fit.n_clusters_),
                   "clusters/largest_share": float(fit.sizes_.max() / total),
                   "clusters/median_share": float(np.median(fit.sizes_) / total),
                   "clusters/unclustered_share": float((fit.labels_ < 0).mean())}
        induction = self.patterns == "induction"
        if induction.any():
            shares = [(fit.labels_[induction] == k).mean() for k in range(fit.n_clusters_)]
            scalars["clusters/induction_purity"] = float(max(shares))
        return scalars


def cluster_snapshot(result: SusceptibilityResult, **options) -> SnapshotClusters:
    """Patterns and clusters of ``result`` (``options``: of :class:`TokenClusters`)."""
    patterns = result_patterns(result)
    try:
        clusters = TokenClusters(**options).fit(result, patterns)
    except ValueError as error:
        warnings.warn(f"Snapshot at step {result.step}: no token clusters ({error})",
                      stacklevel=2)
        return SnapshotClusters(result.step, patterns, None, str(error))
    return SnapshotClusters(result.step, patterns, clusters)


@dataclass
class SeriesClusters:
    """Every snapshot's clusters, the body plan of the series (None with fewer than 2
    components finite throughout) and the emergence of the last snapshot's clusters
    ``(K, snapshots)`` (see :func:`~susc_callback.clusters.body_plan.cluster_emergence`;
    every snapshot clustered into the last one's K clusters for it)."""

    snapshots: list[SnapshotClusters]
    body_plan: BodyPlan | None
    emergence: np.ndarray | None


def cluster_series(results: list[SusceptibilityResult], **options) -> SeriesClusters:
    """The clusters of every snapshot of one series (step order) and its body plan."""
    results = sorted(results, key=lambda r: -1 if r.step is None else r.step)
    snapshots = [cluster_snapshot(r, **options) for r in results]
    last = snapshots[-1].clusters
    try:
        plan = BodyPlan().fit(results, None if last is None else last.labels_)
    except ValueError as error:
        warnings.warn(f"No body plan: {error}", stacklevel=2)
        plan = None
    emergence = None
    if last is not None and all(s.clusters is not None for s in snapshots):
        # every snapshot clustered into the last one's number of clusters: the overlap
        # then measures the partition, not each snapshot's own eigengap choice (a
        # snapshot that already has that many clusters keeps its own clustering)
        count = max(2, last.n_clusters_)
        emergence = cluster_emergence(last.labels_, [
            s.clusters.labels_ if s.clusters.n_clusters_ == count else
            TokenClusters(**{**options, "n_clusters": count}).fit(r).labels_
            for s, r in zip(snapshots, results)])
    return SeriesClusters(snapshots, plan, emergence)
