"""What the benchmark prints: correlations, timings, verdicts against the targets."""

from __future__ import annotations

import math

import numpy as np

TARGETS = {
    # (workload, metric): (comparison, threshold)
    ("medium", "engine/plain time"): ("<=", 0.75),
    ("tiny", "devinterp/engine time"): (">=", 10.0),
    ("medium", "devinterp/engine time"): (">=", 1.4),
    ("paper-scale", "devinterp/engine time"): (">=", 10.0),
    ("many-chains", "engine/floor time"): ("<=", 2.0),
    ("many-chains", "engine time (s)"): ("<=", 120.0),
    ("many-chains", "min correlation"): (">=", 0.95),
}
MEMORY_RATIO_LIMIT = 1.2  # peak at 200 draws / peak at 50 draws


def chi_correlation(a: np.ndarray, b: np.ndarray, names: list[str]) -> dict:
    """Pearson correlation of two (components, tokens) matrices: overall, per layer, and the
    median over components of the per-row correlation."""
    def corr(x, y):
        x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or x[ok].std() == 0 or y[ok].std() == 0:
            return float("nan")
        return float(np.corrcoef(x[ok], y[ok])[0, 1])

    out = {"overall": corr(a, b)}
    layers = sorted({n.split("h")[0] for n in names})
    for layer in layers:
        rows = [i for i, n in enumerate(names) if n.split("h")[0] == layer]
        out[layer] = corr(a[rows], b[rows])
    out["median row"] = float(np.nanmedian([corr(a[i], b[i]) for i in range(len(names))]))
    return out


def verdict(value: float, op: str, threshold: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    ok = value <= threshold if op == "<=" else value >= threshold
    return "PASS" if ok else "FAIL"


def median_time(runs: list[dict]) -> float:
    return float(np.median([r["time_s"] for r in runs]))


def spread_text(runs: list[dict]) -> str:
    """"  [median of 3: 1.90 2.02 2.31 s]" (empty for a single run)."""
    if len(runs) < 2:
        return ""
    times = " ".join(f"{t:.2f}" for t in sorted(r["time_s"] for r in runs))
    return f"  [median of {len(runs)}: {times} s]"


def format_correlation(c: dict) -> str:
    parts = [f"overall {c['overall']:+.3f}"]
    parts += [f"{k} {v:+.3f}" for k, v in c.items() if k not in ("overall", "median row")]
    parts.append(f"median per head {c['median row']:+.3f}")
    return ", ".join(parts)
