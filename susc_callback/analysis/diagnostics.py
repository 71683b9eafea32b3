"""Chain diagnostics from the traces every result keeps (the mean probe loss at every draw
of every chain, :meth:`~susc_callback.estimator.results.SusceptibilityResult.
diagnostic_traces`: one fixed set for all chains, whatever ``L`` is measured on): are the
chains sampling one stationary posterior?

* ``rhat``: the rank-free split R-hat of Gelman et al. (each chain cut in halves; the
  between- over the within-half variance). Near 1 when all chains sample the same
  distribution; above ``RHAT_LIMIT`` they disagree. Short chains make it noisy: ``M``
  stationary half-chains of effective sample size ``ESS`` in all give ``R-hat^2 ~ 1 +
  M / ESS`` (the halves' means vary by their Monte-Carlo error), so the limit applied is
  ``sqrt(RHAT_LIMIT^2 + M / ESS)``: ``RHAT_LIMIT`` for long chains, wider for the short
  ones of a snapshot or a calibration sweep.
* ``ess``: the effective sample size of the pooled draws: their autocorrelation, relative
  to a variance that includes the spread between the chains' means (so that short chains
  are not credited with more independent draws than they hold), summed up to the first
  negative pair of lags (Geyer's initial positive sequence).
* ``drift``: the slope of ``L`` over the draws (least squares on the chain-mean trace)
  in standard errors of the slope (from the ESS of the detrended traces): beyond
  ``DRIFT_LIMIT`` the traces trend, a sign of too large a step size (rising), too short a
  burn-in (falling) or a chain leaving the basin.

:func:`snapshot_problems` adds the localisation share (``result.localisation``): above
``LOCALISATION_LIMIT`` the localisation, not the loss, sets nearly all of a posterior's
spread, so its susceptibilities mostly reflect gamma.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from susc_callback.estimator.autocorrelation import (
    autocorrelation,
    integrated_time,
    pooled_autocorrelation,
)

RHAT_LIMIT = 1.1
DRIFT_LIMIT = 4.0
LOCALISATION_LIMIT = 0.95


@dataclass(frozen=True)
class TraceDiagnostics:
    rhat: float
    ess: float
    drift: float
    rhat_limit: float = field(default=RHAT_LIMIT, kw_only=True)  # widened for short chains

    def problems(self) -> list[str]:
        """What the diagnostics say is wrong, in words (empty when nothing is)."""
        found = []
        if np.isfinite(self.rhat) and self.rhat > self.rhat_limit:
            found.append(f"chains disagree (R-hat {self.rhat:.2f} > {self.rhat_limit:.2f})")
        if np.isfinite(self.drift) and abs(self.drift) > DRIFT_LIMIT:
            direction = "rises" if self.drift > 0 else "falls"
            found.append(f"the loss {direction} over the draws ({self.drift:+.1f} standard "
                         "errors: step size too large, burn-in too short, or the chain "
                         "leaves the basin)")
        return found


def diagnose(traces: np.ndarray) -> TraceDiagnostics:
    """Diagnostics of ``(chains, draws)`` traces (NaN draws of diverged chains dropped)."""
    traces = np.asarray(traces, dtype=np.float64)
    traces = traces[np.isfinite(traces).all(axis=1)]
    if traces.size == 0 or traces.shape[1] < 4:
        return TraceDiagnostics(float("nan"), float("nan"), float("nan"))
    return TraceDiagnostics(split_rhat(traces), effective_sample_size(traces),
                            drift(traces), rhat_limit=rhat_limit(traces))


def rhat_limit(traces: np.ndarray) -> float:
    """``sqrt(RHAT_LIMIT^2 + M / ESS)`` for ``M`` half-chains. The ESS is the chains' own,
    from their within-chain autocorrelation alone: the pooled one shrinks when the chains
    disagree, and would widen the limit just when R-hat should flag them."""
    ess = _effective_sample_size(traces, autocorrelation(traces))
    if not np.isfinite(ess) or ess <= 0:
        return RHAT_LIMIT
    return float(np.sqrt(RHAT_LIMIT ** 2 + 2 * len(traces) / ess))


def split_rhat(traces: np.ndarray) -> float:
    half = traces.shape[1] // 2
    halves = np.concatenate([traces[:, :half], traces[:, half:2 * half]])
    n = halves.shape[1]
    within = halves.var(axis=1, ddof=1).mean()
    between = n * halves.mean(axis=1).var(ddof=1)
    if within <= 0:
        return float("nan")
    return float(np.sqrt(((n - 1) / n * within + between / n) / within))


def effective_sample_size(traces: np.ndarray) -> float:
    """Effective number of independent draws among ``(chains, draws)`` traces."""
    return _effective_sample_size(traces, pooled_autocorrelation(traces))


def _effective_sample_size(traces: np.ndarray, rho: np.ndarray | None) -> float:
    chains, n = traces.shape
    if rho is None:
        return float("nan")
    tau = max(integrated_time(rho), 1.0 / (chains * n))
    return float(chains * n / tau)


def drift(traces: np.ndarray) -> float:
    """Slope of the chain-mean trace over the draws, in standard errors."""
    mean = traces.mean(axis=0)
    n = len(mean)
    draws = np.arange(n) - (n - 1) / 2
    slope = (draws * (mean - mean.mean())).sum() / (draws ** 2).sum()
    residual = traces - traces.mean(axis=1, keepdims=True) - slope * draws  # detrended
    # a least-squares slope's SE with ESS independent points spread over the draws
    ess = _effective_sample_size(residual, autocorrelation(residual))  # chain means are 0
    se = np.sqrt(residual.var() / (ess * (draws ** 2).mean()))
    return float(slope / se) if se > 0 else float("nan")


def trace_diagnostics(result, warmup: int = 0) -> dict[str, TraceDiagnostics]:
    """``{component: diagnostics}`` of a result's traces (failed components left out),
    and ``"full"`` for the full chain; the first ``warmup`` draws left out."""
    traces, full = result.diagnostic_traces()
    found = {name: diagnose(trace[:, warmup:]) for name, trace in
             zip(result.component_names, traces) if name not in result.failed}
    found["full"] = diagnose(full[:, warmup:])
    return found


def localisation_shares(result) -> dict[str, float]:
    """``{component: localisation share}`` and ``"full"`` (empty in results without
    them)."""
    if result.localisation is None:
        return {}
    shares = dict(zip(result.component_names, result.localisation))
    shares["full"] = result.full_localisation
    return shares


def snapshot_problems(result) -> list[str]:
    """``"component: problem"`` for every problem the traces and the localisation shares
    of ``result`` show (empty when there is none)."""
    found = [f"{name}: {problem}" for name, diagnostics in trace_diagnostics(result).items()
             for problem in diagnostics.problems()]
    found += [f"{name}: the localisation sets {share:.0%} of the posterior's spread "
              f"(> {LOCALISATION_LIMIT:.0%}): the loss hardly confines it, so its "
              "susceptibilities mostly reflect gamma (lower gamma or raise n_beta)"
              for name, share in localisation_shares(result).items()
              if share is not None and np.isfinite(share) and share > LOCALISATION_LIMIT]
    return found
