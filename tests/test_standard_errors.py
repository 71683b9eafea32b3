"""The reported standard errors against the spread of many independent estimates.

The Gaussian linear-regression problem of test_closed_form.py (exact values from its
closed forms): SEEDS independent estimates (seeds 0..SEEDS-1) of component "a", 4 chains
x 200 draws. The mean reported standard error is compared with the standard deviation of
the estimates over the seeds. The SD of SEEDS = 60 estimates is itself uncertain by about
9 %, so: averaged over the 6 probe tokens (chi), and for dataset chi, rLLC and the LLC,
within 20 %; every token within 35 %. The 95 % intervals ``estimate +- 1.96 SE`` must
cover the exact value 90-99 % of the time (pooled over the probe tokens: 360 intervals,
binomial sd 1.1 %). Measured: the SEs run about 10 % below the spread (coverage 0.91).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_closed_form import (
    COMPONENTS,
    D_IN,
    D_OUT,
    EPS,
    GAMMA,
    N_BETA,
    N,
    Problem,
    engine_inputs,
    loss_fn,
)

from susc_callback import Component, SGLDConfig, estimate_susceptibilities

pytestmark = pytest.mark.slow
SEEDS, CHAINS, DRAWS, BURNIN = 60, 4, 200, 50


def _estimates(seeds, observable, observable_sequences, draws, **settings):
    problem = Problem()
    model, data, probe = engine_inputs(problem)
    component = Component("a", {"weight": torch.tensor(COMPONENTS["a"].reshape(D_OUT, D_IN))})
    results = []
    for seed in range(seeds):
        config = SGLDConfig(step_size=EPS, n_beta=N_BETA, gamma=GAMMA, num_chains=CHAINS,
                            num_draws=draws, num_burnin=BURNIN, batch_size=N,
                            observable=observable, observable_sequences=observable_sequences,
                            eval_batch_size=N, seed=seed, progress=False,
                            **{"workers": 2, **settings})
        results.append(estimate_susceptibilities(model, [component], data, probe, config,
                                                 loss_fn=loss_fn))
    return problem, results


@pytest.fixture(scope="module")
def estimates():
    """L on all N sampling points: no choice of observable sequences to vary."""
    return _estimates(SEEDS, "fixed", N, DRAWS)


def _ratios(results):
    """Mean reported SE over the SD across seeds, per quantity."""
    quantities = {
        "chi": (np.stack([r.chi[0] for r in results]), np.stack([r.chi_se[0] for r in results])),
        "dataset_chi": (np.stack([r.dataset_chi[0] for r in results]),
                        np.stack([r.dataset_chi_se[0] for r in results])),
        "rllc": (np.array([r.rllc[:1] for r in results]),
                 np.array([r.rllc_se[:1] for r in results])),
        "llc": (np.array([[r.llc_full] for r in results]),
                np.array([[r.llc_full_se] for r in results]))}
    ratios = {name: errors.mean(0) / values.std(0, ddof=1)
              for name, (values, errors) in quantities.items()}
    for name, ratio in ratios.items():
        print(f"{name}: mean SE / SD over seeds {np.round(ratio, 3)}")
    return ratios


def ratio_tolerance(seeds: int) -> float:
    """The SD over ``seeds`` seeds has a relative sampling error of about
    ``1 / sqrt(2 (seeds - 1))`` (9 % at 60 seeds, 11 % at 40): a mean SE / SD within 3 of
    those of 1."""
    return 3 / np.sqrt(2 * (seeds - 1))


def test_standard_errors_match_the_spread_of_estimates(estimates):
    for name, ratio in _ratios(estimates[1]).items():
        assert abs(ratio.mean() - 1) < ratio_tolerance(SEEDS), name
        np.testing.assert_array_less(np.abs(ratio - 1), 0.35)


def test_95_percent_intervals_cover_the_exact_values(estimates):
    problem, results = estimates
    _, exact = problem.exact(COMPONENTS["a"])
    values = np.stack([r.chi[0] for r in results])
    errors = np.stack([r.chi_se[0] for r in results])
    covered = np.abs(values - exact) <= 1.96 * errors
    print(f"coverage of chi's 95 % intervals: {covered.mean():.3f} "
          f"({covered.size} intervals)")
    assert 0.90 <= covered.mean() <= 0.99
    assert not (np.abs(values - exact) <= 1.96 * errors / 2).mean() >= 0.9  # SE/2 would fail


def test_observable_sets_of_ten_sequences_unbiased_and_in_the_errors():
    """L on 10 of the 40 sampling points.

    One fixed set per seed, without the finite-set correction: the estimates are biased
    (a uniform shift of about +0.0008, several times the exact values; a numpy check of
    the closed forms averaged over sets gives the same) and the SEs miss most of the
    seed-to-seed spread (measured 0.13-0.23 of it), which the set dominates. A set per
    block of draws, corrected (the defaults): the mean over seeds is the exact value
    within 3.5 SE of a mean of 40, and the SEs match the spread (SD uncertain by ~11 %:
    mean ratio within 3 of those) once blocks (200 draws) are long against the chains'
    autocorrelation."""
    problem, fixed = _estimates(20, "fixed", 10, DRAWS, unbiased_observable=False)
    _, exact = problem.exact(COMPONENTS["a"])
    ratios = _ratios(fixed)
    assert ratios["chi"].max() < 0.5 and ratios["dataset_chi"].max() < 0.5
    values = np.stack([r.chi[0] for r in fixed])
    assert ((values.mean(0) - exact) > 3 * values.std(0, ddof=1) / np.sqrt(20)).sum() >= 4
    _, per_block = _estimates(40, "per-block", 10, 4 * DRAWS)
    for name, ratio in _ratios(per_block).items():
        assert abs(ratio.mean() - 1) < ratio_tolerance(40), name
    values = np.stack([r.chi[0] for r in per_block])
    print(f"per-block mean {np.round(values.mean(0), 5)}, exact {np.round(exact, 5)}")
    np.testing.assert_array_less(np.abs(values.mean(0) - exact),
                                 3.5 * values.std(0, ddof=1) / np.sqrt(40))
