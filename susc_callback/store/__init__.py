"""Results on disk: the format of one result folder, and the layout of a run's results."""
