"""Autocorrelation of chain traces and the integrated autocorrelation time, shared by the
chain diagnostics (effective sample size) and the draw spacing."""

from __future__ import annotations

import numpy as np


def autocorrelation(traces: np.ndarray, max_lag: int | None = None) -> np.ndarray | None:
    """The chains' mean autocorrelation of ``(chains, draws)`` traces at lags ``0 ..
    max_lag`` (default: every lag); None for constant traces."""
    n = traces.shape[1]
    centred = traces - traces.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=2 * n, axis=1)
    autocov = np.fft.irfft(spectrum * spectrum.conj(), axis=1)[:, :n].mean(0) / n
    if autocov[0] <= 0:
        return None
    return autocov[:n if max_lag is None else max_lag + 1] / autocov[0]


def integrated_time(rho: np.ndarray) -> float:
    """``1 + 2 sum_lag rho(lag)``, summed over consecutive pairs of lags up to the first
    negative pair (Geyer's initial positive sequence)."""
    total = 0.0
    for lag in range(1, len(rho) - 1, 2):
        pair = rho[lag] + rho[lag + 1]
        if pair < 0:
            break
        total += pair
    return 1.0 + 2.0 * total
