"""Chain diagnostics on synthetic traces with known properties."""

from __future__ import annotations

import numpy as np

from susc_callback.analysis.diagnostics import diagnose


def ar1(chains: int, draws: int, rho: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((chains, draws))
    x[:, 0] = rng.normal(size=chains) / np.sqrt(1 - rho ** 2)
    for t in range(1, draws):
        x[:, t] = rho * x[:, t - 1] + rng.normal(size=chains)
    return x


def test_the_effective_sample_size_of_an_ar1_process():
    """ESS of an AR(1) chain is n (1 - rho) / (1 + rho); averaged over 20 replicates the
    estimate is within 10 % (the estimator's own spread is about 15 % per replicate)."""
    for rho in (0.0, 0.5, 0.8):
        exact = 8 * 2000 * (1 - rho) / (1 + rho)
        found = np.mean([diagnose(ar1(8, 2000, rho, seed)).ess for seed in range(20)])
        assert abs(found / exact - 1) < 0.1, (rho, found, exact)


def test_short_chains_are_not_credited_with_more_draws_than_they_hold():
    """The exact ESS of the pooled mean of M stationary AR(1) chains of n draws is
    M n^2 / sum_{s,t} rho^|s-t|. Averaged over 200 replicates the estimate is within 25 %
    of it (measured: +6 %, +11 %, -4 %); per-chain autocorrelations, which ignore the
    spread of the chain means, gave +39 %, +81 % and +66 %."""
    for chains, draws, rho in ((4, 20, 0.5), (4, 10, 0.5), (4, 40, 0.8)):
        lags = np.abs(np.subtract.outer(np.arange(draws), np.arange(draws)))
        exact = chains * draws ** 2 / (rho ** lags).sum()
        found = np.mean([diagnose(ar1(chains, draws, rho, seed)).ess for seed in range(200)])
        assert abs(found / exact - 1) < 0.25, (chains, draws, rho, found, exact)


def test_rhat_and_drift_flag_what_is_wrong_and_only_that():
    good = diagnose(ar1(4, 1000, 0.5, 1))
    assert abs(good.rhat - 1) < 0.02 and abs(good.drift) < 4 and good.problems() == []
    apart = ar1(4, 1000, 0.5, 2) + np.array([0.0, 0.0, 0.0, 3.0])[:, None]
    assert diagnose(apart).rhat > 1.1
    assert "chains disagree" in diagnose(apart).problems()[0]
    rising = ar1(4, 1000, 0.5, 3) + np.linspace(0, 2, 1000)
    assert diagnose(rising).drift > 4 and "rises" in diagnose(rising).problems()[-1]
    assert diagnose(ar1(4, 1000, 0.5, 4) - np.linspace(0, 2, 1000)).drift < -4
    false_alarms = sum(diagnose(ar1(4, 500, 0.8, s)).problems() != [] for s in range(50))
    assert false_alarms <= 2


def test_diverged_chains_are_left_out_and_short_traces_give_nan():
    traces = ar1(3, 200, 0.3, 5)
    traces[1, 50:] = np.nan
    assert np.isfinite(diagnose(traces).rhat)
    assert np.isnan(diagnose(ar1(2, 3, 0.3, 6)).ess)


def test_short_chains_get_a_wider_rhat_limit():
    """2 chains x 30 draws (rho 0.6, ESS ~15): stationary chains exceed R-hat 1.1 about 40 %
    of the time (measured over 200 seeds); with the limit sqrt(1.1^2 + M / ESS) (M = 4
    half-chains) 13 % (2 x 60 draws: 13 % against 2 %), while chains 3 sd apart are still
    flagged."""
    short = [diagnose(ar1(2, 30, 0.6, seed)) for seed in range(100)]
    assert sum(d.rhat > 1.1 for d in short) >= 30
    assert sum(any("disagree" in p for p in d.problems()) for d in short) <= 20
    assert all(d.rhat_limit > 1.1 for d in short)
    apart = [diagnose(ar1(2, 30, 0.6, seed) + np.array([[0.0], [3.0 / 0.8]]))
             for seed in range(20)]
    assert all(any("disagree" in p for p in d.problems()) for d in apart)
    assert diagnose(ar1(4, 5000, 0.5, 7)).rhat_limit < 1.101  # long chains: 1.1
