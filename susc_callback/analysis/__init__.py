"""Analysis of results: standardization and PCA, per-token attribution, snapshot series."""
