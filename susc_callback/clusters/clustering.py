"""Clusters of the per-token susceptibility vectors: the model's "spectral lines".

Every probe token has a vector of susceptibilities, one entry per component. Standardized
as for the PCA (default "spectroscopy": each component z-scored over tokens, then each
token centred over components), the vectors are clustered with scikit-learn:

* ``"graph"`` (default): spectral clustering of the symmetrised k-nearest-neighbour graph,
  a normalised-cut method in the spirit of the spectroscopy paper's conductance
  clustering. Without ``n_clusters`` the number is the largest eigengap of the graph's
  normalised adjacency among its ``max_clusters`` leading eigenvalues;
* ``"kmeans"``: k-means (``n_clusters`` required);
* ``"hdbscan"``: HDBSCAN (the number of clusters is its own; unclustered tokens get -1).

The k-nearest-neighbour graph is sparse (tokens x k), so memory grows linearly with the
tokens; the vectors are first reduced to their ``max_dims`` (64) leading principal
components.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
from scipy.sparse.linalg import eigsh
from sklearn.cluster import HDBSCAN, KMeans, SpectralClustering
from sklearn.decomposition import PCA
from sklearn.neighbors import kneighbors_graph

from susc_callback.analysis.pca import Standardization, standardize
from susc_callback.estimator.results import SusceptibilityResult

Method = Literal["graph", "kmeans", "hdbscan"]
METHODS = ("graph", "kmeans", "hdbscan")


class TokenClusters:
    """Clusters of one result's standardized per-token vectors (see module docstring).

    Learned attributes (after :meth:`fit`): ``component_names_`` (finite components),
    ``labels_`` ``(P,)`` cluster of every probe token (-1: none), ``n_clusters_``,
    ``sizes_`` ``(K,)``, ``profiles_`` ``(K, C)`` mean standardized vector of each cluster,
    ``chi_profiles_`` ``(K, C)`` its mean raw susceptibility, ``typical_`` (K lists of the
    token indices nearest the cluster's mean, nearest first) and, when ``patterns`` are
    given, ``pattern_names_`` and ``pattern_counts_`` ``(K, patterns)``; likewise
    ``dataset_counts_`` ``(K, D)`` over the probe datasets.
    """

    def __init__(self, method: Method = "graph", n_clusters: int | None = None, *,
                 n_neighbors: int = 15, max_clusters: int = 30, max_dims: int = 64,
                 standardization: Standardization = "spectroscopy", typical: int = 8,
                 random_state: int = 0) -> None:
        self.method, self.n_clusters, self.n_neighbors = method, n_clusters, n_neighbors
        self.max_clusters, self.max_dims, self.standardization = max_clusters, max_dims, \
            standardization
        self.typical, self.random_state = typical, random_state

    def fit(self, result: SusceptibilityResult, patterns: np.ndarray | None = None
            ) -> TokenClusters:
        self._check(result)
        keep = result.finite_components
        self.component_names_ = [n for n, k in zip(result.component_names, keep) if k]
        vectors = standardize(result.chi[keep], self.standardization)
        reduced = reduce(vectors, self.max_dims, self.random_state)
        self.labels_ = self._cluster(reduced)
        found = sorted(set(self.labels_.tolist()) - {-1})
        remap = {old: new for new, old in enumerate(found)}
        self.labels_ = np.array([remap.get(v, -1) for v in self.labels_.tolist()])
        self.n_clusters_ = len(found)
        members = [np.flatnonzero(self.labels_ == k) for k in range(self.n_clusters_)]
        self.sizes_ = np.array([len(m) for m in members])
        self.profiles_ = np.stack([vectors[m].mean(0) for m in members])
        self.chi_profiles_ = np.stack([result.chi[keep][:, m].mean(1) for m in members])
        self.typical_ = [m[np.argsort(((reduced[m] - reduced[m].mean(0)) ** 2).sum(1),
                                      kind="stable")[:self.typical]] for m in members]
        self.dataset_counts_ = _counts(result.token_dataset, len(result.dataset_names),
                                       members)
        if patterns is not None:
            self.pattern_names_ = sorted(set(patterns.tolist()))
            index = np.array([self.pattern_names_.index(p) for p in patterns])
            self.pattern_counts_ = _counts(index, len(self.pattern_names_), members)
        return self

    def _check(self, result: SusceptibilityResult) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "kmeans" and self.n_clusters is None:
            raise ValueError("method='kmeans' needs n_clusters")
        if self.n_clusters is not None and not 2 <= self.n_clusters <= len(result.chi[0]):
            raise ValueError(f"n_clusters must be in [2, {len(result.chi[0])}] (the probe "
                             f"tokens), got {self.n_clusters}")
        if result.finite_components.sum() < 2:
            raise ValueError("Clustering needs >= 2 components with finite susceptibilities")
        if len(result.chi[0]) <= self.n_neighbors:
            raise ValueError(f"Clustering needs more probe tokens ({len(result.chi[0])}) "
                             f"than n_neighbors ({self.n_neighbors})")

    def _cluster(self, x: np.ndarray) -> np.ndarray:
        if self.method == "kmeans":
            return KMeans(self.n_clusters, n_init=4, random_state=self.random_state
                          ).fit_predict(x)
        if self.method == "hdbscan":
            return HDBSCAN(min_cluster_size=max(5, len(x) // 200), copy=True).fit_predict(x)
        graph = kneighbors_graph(x, self.n_neighbors, include_self=False)
        graph = ((graph + graph.T) > 0).astype(np.float64)
        count = self.n_clusters or eigengap_count(graph, self.max_clusters)
        with warnings.catch_warnings():  # a disconnected graph is well-separated clusters
            warnings.filterwarnings("ignore", "Graph is not fully connected")
            return SpectralClustering(count, affinity="precomputed",
                                      assign_labels="cluster_qr",
                                      random_state=self.random_state).fit_predict(graph)


def reduce(vectors: np.ndarray, max_dims: int, random_state: int = 0) -> np.ndarray:
    """The vectors on their ``max_dims`` leading principal components (all of them when
    there are fewer)."""
    if vectors.shape[1] <= max_dims:
        return vectors
    return PCA(max_dims, random_state=random_state).fit_transform(vectors)


def eigengap_count(graph, max_clusters: int) -> int:
    """The number of clusters at the largest gap between consecutive leading eigenvalues
    of the graph's normalised adjacency ``D^-1/2 A D^-1/2`` (eigenvalue 1 - that of the
    normalised Laplacian), at least 2."""
    degree = np.asarray(graph.sum(axis=1)).ravel()
    scale = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    normalised = graph.multiply(scale[:, None]).multiply(scale[None, :]).tocsr()
    k = min(max_clusters + 1, graph.shape[0] - 1)
    values = np.sort(eigsh(normalised, k=k, which="LA", return_eigenvectors=False))[::-1]
    gaps = values[1:-1] - values[2:]  # gap after the 2nd, 3rd, ... eigenvalue
    return int(np.argmax(gaps)) + 2


def _counts(index: np.ndarray, count: int, members: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(index[m], minlength=count) for m in members])
