"""Agreement of two results on the same probe: the basic convergence check."""

from __future__ import annotations

import numpy as np

from susc_callback.estimator.results import SusceptibilityResult


def compare_results(a: SusceptibilityResult, b: SusceptibilityResult) -> dict[str, float]:
    """Pearson correlation of two results' per-token rows, per shared component (e.g. two
    seeds or two samplers on one checkpoint: the basic convergence check). Both must be on
    the same probe tokens; a component failed in either gets NaN."""
    if not (np.array_equal(a.probe_input_ids, b.probe_input_ids)
            and np.array_equal(a.token_sequence, b.token_sequence)
            and np.array_equal(a.token_position, b.token_position)):
        raise ValueError("The two results are on different probe tokens; compare results of "
                         "the same probe set")
    shared = [name for name in a.component_names if name in b.component_names]
    if not shared:
        raise ValueError(f"No component in common: {a.component_names} vs {b.component_names}")
    correlations = {}
    for name in shared:
        x = a.chi[a.component_names.index(name)]
        y = b.chi[b.component_names.index(name)]
        finite = np.isfinite(x).all() and np.isfinite(y).all()
        varying = finite and x.std() > 0 and y.std() > 0
        correlations[name] = float(np.corrcoef(x, y)[0, 1]) if varying else float("nan")
    return correlations
