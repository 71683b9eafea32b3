"""Token clusters and the developmental body plan: the per-token susceptibility vectors
analysed directly (spectroscopy and embryology)."""

from susc_callback.clusters.clustering import TokenClusters
from susc_callback.clusters.patterns import tag_tokens

__all__ = ["TokenClusters", "tag_tokens"]
