"""``steps_between_draws="auto"``: the thinned autocorrelation time against the AR(1)
closed form, the choice against a brute-force optimum, and the engine's use of it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import estimate

from susc_callback import SGLDConfig
from susc_callback.estimator.autocorrelation import autocorrelation, integrated_time
from susc_callback.estimator.spacing import choose_spacing, cost_ratio


def _ar1(a: float, chains: int, draws: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((chains, draws))
    x[:, 0] = rng.normal(size=chains) / np.sqrt(1 - a * a)
    for t in range(1, draws):
        x[:, t] = a * x[:, t - 1] + rng.normal(size=chains)
    return x


@pytest.mark.parametrize("a", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_thinned_time_of_an_ar1_chain(a, k):
    """Kept every k steps an AR(1) chain is AR(1) with a^k: tau = (1 + a^k) / (1 - a^k)."""
    rho = a ** np.arange(2000)
    assert integrated_time(rho[::k]) == pytest.approx((1 + a ** k) / (1 - a ** k), rel=1e-6)


def test_the_measured_autocorrelation_of_ar1_traces():
    rho = autocorrelation(_ar1(0.8, chains=8, draws=4000))
    np.testing.assert_allclose(rho[:6], 0.8 ** np.arange(6), atol=0.03)


@pytest.mark.parametrize(("a", "ratio"), [(0.9, 2.0), (0.6, 2.0), (0.9, 0.1), (0.2, 3.0)])
def test_the_choice_maximises_independent_draws_per_unit_of_work(a, ratio):
    """Against the exact optimum of 1 / (tau_k (k + r)) with the closed-form tau_k: the
    rate of the chosen spacing is within 5 % of the best rate."""
    chosen = choose_spacing(_ar1(a, chains=8, draws=4000), ratio).steps_between_draws
    rate = lambda k: (1 - a ** k) / ((1 + a ** k) * (k + ratio))  # noqa: E731
    best = max(range(1, 33), key=rate)
    assert rate(chosen) >= 0.95 * rate(best), (chosen, best)
    if a == 0.2:  # nearly independent steps and costly draws: still draw every step or two
        assert chosen <= 2


def test_cost_ratio_counts_passes():
    config = SGLDConfig(batch_size=8, observable_sequences=24)
    assert cost_ratio(config, probe_sequences=32) == pytest.approx(56 / 24)
    assert cost_ratio(config.replace(observable="minibatch"), 32) == pytest.approx(32 / 24)


def test_auto_spacing_in_the_engine(gpt2, probe, sampling_ids, config):
    auto = config.replace(steps_between_draws="auto", num_draws=6)
    result = estimate(gpt2, probe, sampling_ids, auto)
    spacing = result.extra["draw_spacing"]
    assert result.config["steps_between_draws"] == "auto"
    assert 1 <= spacing["steps_between_draws"] <= 32 and spacing["gain_over_every_step"] >= 1
    fixed = estimate(gpt2, probe, sampling_ids,
                     auto.replace(steps_between_draws=spacing["steps_between_draws"]))
    np.testing.assert_array_equal(result.chi, fixed.chi)  # the pilot leaves no trace
    assert result.loss_traces.shape[-1] == 6


def test_an_unresolved_auto_spacing_is_named():
    config = SGLDConfig(steps_between_draws="auto")
    with pytest.raises(ValueError, match="steps_between_draws='auto' is resolved per estimate"):
        config.num_steps  # noqa: B018
    with pytest.raises(ValueError, match="Invalid steps_between_draws: 'often'"):
        SGLDConfig(steps_between_draws="often")
    assert SGLDConfig.from_dict(config.to_dict()) == config
