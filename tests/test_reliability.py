"""Split-half reliability and the separation margin's permutation test, on synthetic
matrices with known signal and noise, and the engine's half estimates."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import estimate
from test_analysis import _result

from susc_callback import SusceptibilityPCA, head_components
from susc_callback.analysis.diagnostics import snapshot_problems
from susc_callback.analysis.reliability import (
    loading_errors,
    margin_significance,
    separation_margin,
    split_half_reliability,
)
from susc_callback.logging.report import write_report
from susc_callback.logging.tensorboard import snapshot_scalars

COMPONENTS, TOKENS = 12, 400


def _noisy_halves(truth: np.ndarray, noise: float, rng: np.random.Generator):
    halves = truth[None] + noise * rng.normal(size=(2, *truth.shape))
    return replace(_result(halves.mean(0)), chi_halves=halves)


def _planted(rng, group_strength: float, noise: float = 0.3):
    """Every component shares one profile; components 0-2 also share a second one."""
    common, special = rng.normal(size=TOKENS), rng.normal(size=TOKENS)
    truth = np.outer(rng.uniform(0.5, 1.5, COMPONENTS), common)
    truth[:3] += group_strength * special
    truth += 0.5 * rng.normal(size=truth.shape)  # each component's own profile
    return _noisy_halves(truth, noise, rng)


def test_split_half_correlations_match_the_signal_to_noise_ratio():
    """Each row: signal variance 1, noise variance 0.5 per half, so the halves correlate
    at 1 / 1.5 and two whole estimates (noise 0.25) at 1 / 1.25 = Spearman-Brown."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(COMPONENTS, 4000))
    found = split_half_reliability(_noisy_halves(truth, np.sqrt(0.5), rng))
    np.testing.assert_allclose(found.component_r, 1 / 1.5, atol=0.03)  # sd ~0.008
    whole = [truth + 0.5 * rng.normal(size=truth.shape) for _ in range(2)]
    empirical = [np.corrcoef(a, b)[0, 1] for a, b in zip(*whole)]
    np.testing.assert_allclose(found.whole_estimate_r, empirical, atol=0.03)
    assert found.loadings_r.shape == (3,)


def test_a_planted_group_is_significant_and_random_groups_are_not():
    rng = np.random.default_rng(1)
    result = _planted(rng, group_strength=1.0)
    planted = margin_significance(result, {"c0", "c1", "c2"}, permutations=5000)
    assert planted.margin > 0 and planted.p_value < 0.01  # the best of all 220 groups
    assert len(planted.null_margins) == 220  # C(12, 3): every group, enumerated
    assert min(planted.half_margins) > 0
    p_values = [margin_significance(result, {f"c{i}" for i in rng.choice(
        np.arange(3, COMPONENTS), 3, replace=False)}).p_value for _ in range(20)]
    assert sum(p < 0.05 for p in p_values) <= 3  # binomial(20, 0.05): P(> 3) = 1.6 %


def test_without_a_planted_group_p_values_are_not_small():
    rng = np.random.default_rng(2)
    p_values = []
    for _ in range(20):
        result = _planted(rng, group_strength=0.0)
        p_values.append(margin_significance(result, {"c0", "c1", "c2"}).p_value)
    assert sum(p < 0.05 for p in p_values) <= 3
    assert 0.3 < np.mean(p_values) < 0.7  # uniform: mean 0.5, sd of the mean 0.065


def test_a_named_pc_and_bad_groups():
    result = _planted(np.random.default_rng(3), group_strength=1.0)
    on_pc = margin_significance(result, ["c0", "c1", "c2"], pc=0)
    assert on_pc.pc == 0
    with pytest.raises(ValueError, match="Unknown components \\['zz'\\]"):
        margin_significance(result, {"zz"})
    with pytest.raises(ValueError, match="some but not all"):
        margin_significance(result, {f"c{i}" for i in range(COMPONENTS)})
    with pytest.raises(ValueError, match="Invalid pc: 7"):
        margin_significance(result, {"c0"}, pc=7)
    with pytest.raises(ValueError, match="no half estimates"):
        split_half_reliability(replace(result, chi_halves=None))


def test_separation_margin_orients_the_pc():
    names = ["a", "b", "c", "d"]
    assert separation_margin(np.array([0.9, 0.8, 0.1, 0.0]), names, {"a", "b"}) \
        == pytest.approx(0.7)
    assert separation_margin(np.array([-0.9, -0.8, -0.1, 0.0]), names, {"a", "b"}) \
        == pytest.approx(0.7)
    assert np.isnan(separation_margin(np.zeros(4), names, set(names)))


def test_the_engine_halves_are_estimates_from_half_the_chains(gpt2, probe, sampling_ids,
                                                              config):
    """With 2 chains the first half is chain 0: a 1-chain estimate with the same seed."""
    heads = head_components(gpt2)[:3]
    two = estimate(gpt2, probe, sampling_ids, config, components=heads)
    one = estimate(gpt2, probe, sampling_ids, config.replace(num_chains=1), components=heads)
    np.testing.assert_allclose(two.chi_halves[0], one.chi, rtol=1e-5, atol=1e-8)
    assert not np.allclose(two.chi_halves[1], one.chi)
    tokens = len(two.token_sequence)
    assert two.subset(two.component_names[:2]).chi_halves.shape == (2, 2, tokens)


def test_loading_errors_match_the_spread_of_whole_estimates():
    """Over many independent estimates (truth + noise per half), the mean of the squared
    half-difference errors matches the variance of the whole estimate's loadings (the
    errors have one degree of freedom each, so only their mean square is checked)."""
    rng = np.random.default_rng(5)
    truth = _planted(rng, group_strength=1.0).chi
    reference = SusceptibilityPCA(2).fit(_result(truth))
    loadings, squared = [], []
    for _ in range(300):
        estimate = _noisy_halves(truth, 0.3, rng)
        pca = SusceptibilityPCA(2).fit(estimate).align_to(reference)
        loadings.append(pca.loadings_)
        squared.append(loading_errors(estimate, pca) ** 2)
    ratio = np.mean(squared, axis=0) / np.var(loadings, axis=0, ddof=1)
    assert 0.8 < np.median(ratio) < 1.25  # 300 replicates: each ratio uncertain by ~12 %
    same = replace(estimate, chi_halves=np.stack([estimate.chi, estimate.chi]))
    np.testing.assert_allclose(loading_errors(same, pca), 0, atol=1e-12)


def test_a_localisation_dominated_component_is_named():
    result = replace(_planted(np.random.default_rng(6), 1.0),
                     localisation=np.linspace(0.5, 0.99, COMPONENTS), full_localisation=0.4)
    problems = snapshot_problems(result)
    assert len(problems) == 1 and problems[0].startswith("c11: the localisation sets 99%")


def test_snapshot_scalars_and_the_report_show_reliability(tmp_path):
    result = replace(_planted(np.random.default_rng(7), 1.0),
                     localisation=np.full(COMPONENTS, 0.7), full_localisation=0.6)
    pca = SusceptibilityPCA(3).fit(result)
    scalars = snapshot_scalars(result, pca)
    halves = split_half_reliability(result)
    assert scalars["reliability/matrix"] == pytest.approx(halves.matrix_r)
    assert scalars["reliability/split_half/c4"] == pytest.approx(halves.component_r[4])
    assert scalars["diagnostics/localisation/full"] == 0.6
    page = write_report([result], tmp_path).read_text()
    assert "How far to trust step" in page and "half-difference standard error" in page
