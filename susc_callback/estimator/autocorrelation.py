"""Autocorrelation of chain traces and the integrated autocorrelation time, shared by the
chain diagnostics (effective sample size) and the draw spacing."""

from __future__ import annotations

import numpy as np


def autocorrelation(traces: np.ndarray, max_lag: int | None = None) -> np.ndarray | None:
    """The chains' mean autocorrelation of ``(chains, draws)`` traces at lags ``0 ..
    max_lag`` (default: every lag); None for constant traces."""
    autocov = _autocovariances(traces).mean(0)
    if autocov[0] <= 0:
        return None
    n = traces.shape[1]
    return autocov[:n if max_lag is None else max_lag + 1] / autocov[0]


def pooled_autocorrelation(traces: np.ndarray) -> np.ndarray | None:
    """Autocorrelation of ``(chains, draws)`` traces at every lag, relative to the pooled
    variance that counts the spread between the chains' means as well as within them
    (Vehtari et al. 2021, "Rank-normalization, folding, and localization", eq. 10 without
    the rank normalisation); None for constant traces.

    Each short chain's own mean absorbs part of its slow wandering, so per-chain
    autocorrelations come out too low and the effective sample size too high (+39 % at 4
    chains of 20 draws with lag-one correlation 0.5, +81 % at 10 draws); the spread of the
    chain means puts that part back. It takes two chains or more: one chain has no such
    spread, and gets the per-chain estimate shifted by ``1 / (draws - 1)``."""
    chains, n = traces.shape
    within = traces.var(axis=1, ddof=1).mean() if n > 1 else 0.0
    between = traces.mean(axis=1).var(ddof=1) if chains > 1 else 0.0
    pooled = (n - 1) / n * within + between
    if pooled <= 0:
        return None
    rho = 1.0 - (within - _autocovariances(traces).mean(0)) / pooled
    rho[0] = 1.0
    return rho


def _autocovariances(traces: np.ndarray) -> np.ndarray:
    """Each chain's autocovariance at every lag (divisor ``draws``), ``(chains, draws)``."""
    n = traces.shape[1]
    centred = traces - traces.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=2 * n, axis=1)
    return np.fft.irfft(spectrum * spectrum.conj(), axis=1)[:, :n] / n


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
