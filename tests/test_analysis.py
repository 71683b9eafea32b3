"""Standardization, PCA and PC alignment against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest

from susc_callback import SusceptibilityPCA, SusceptibilityResult, align_loadings, standardize


def _result(chi: np.ndarray, datasets=("a", "b")) -> SusceptibilityResult:
    components, tokens = chi.shape
    sequences = np.arange(tokens) % 2
    return SusceptibilityResult(
        component_names=[f"c{i}" for i in range(components)], chi=chi,
        dataset_names=list(datasets), dataset_chi=np.zeros((components, 2)),
        rllc=np.zeros(components), llc_full=0.0, mean_phi=np.zeros(components),
        anchor_loss=np.zeros(components), loss_traces=np.zeros((components, 1, 1)),
        full_loss_trace=np.zeros((1, 1)), token_sequence=sequences,
        token_position=np.arange(tokens), probe_input_ids=np.zeros((2, tokens + 1), np.int64),
        probe_attention_mask=np.ones((2, tokens + 1), np.int64),
        sequence_datasets=list(datasets), config={})


@pytest.fixture
def chi() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(5, 40)) * np.array([1.0, 2.0, 0.5, 3.0, 1.5])[:, None] + 0.3


def test_structural_inference_centres_each_component(chi):
    x = standardize(chi, "structural-inference")
    assert x.shape == (40, 5)
    np.testing.assert_allclose(x, chi.T - chi.mean(axis=1))


def test_spectroscopy_is_blind_to_each_component_scale(chi):
    x = standardize(chi, "spectroscopy")
    z = (chi.T - chi.mean(axis=1)) / chi.std(axis=1)
    np.testing.assert_allclose(x, z - z.mean(axis=1, keepdims=True))
    rescaled = chi * np.array([10.0, 0.1, 3.0, 1.0, 7.0])[:, None]
    np.testing.assert_allclose(standardize(rescaled, "spectroscopy"), x, atol=1e-12)
    np.testing.assert_allclose(x.sum(axis=1), 0.0, atol=1e-12)


def test_bad_standardization_is_named():
    with pytest.raises(ValueError, match="Invalid standardization 'zscore'"):
        standardize(np.zeros((2, 3)), "zscore")


def test_pca_matches_numpy_svd(chi):
    pca = SusceptibilityPCA(n_components=3).fit(_result(chi))
    x = chi.T - chi.mean(axis=1)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(pca.explained_variance_ratio_, (s**2 / (s**2).sum())[:3])
    for k in range(3):
        sign = np.sign(vt[k] @ pca.loadings_[k])
        np.testing.assert_allclose(pca.loadings_[k], sign * vt[k], atol=1e-10)
        np.testing.assert_allclose(pca.token_scores_[:, k], sign * u[:, k] * s[k], atol=1e-10)
    np.testing.assert_allclose(pca.dataset_scores_[0], pca.token_scores_[0::2].mean(axis=0))


def test_pca_leaves_out_failed_components(chi):
    chi = chi.copy()
    chi[1] = np.nan
    pca = SusceptibilityPCA(n_components=2).fit(_result(chi))
    assert pca.component_names_ == ["c0", "c2", "c3", "c4"]
    assert pca.loadings_.shape == (2, 4)


def test_alignment_undoes_a_permutation_and_sign_flips():
    rng = np.random.default_rng(1)
    reference, _ = np.linalg.qr(rng.normal(size=(6, 4)))
    reference = reference.T  # 4 orthonormal loadings over 6 components
    shuffled = reference[[2, 0, 3, 1]] * np.array([-1, 1, -1, 1])[:, None]
    noisy = shuffled + 0.01 * rng.normal(size=shuffled.shape)
    order, signs = align_loadings(noisy, reference)
    assert order.tolist() == [1, 3, 0, 2]
    assert signs.tolist() == [1.0, 1.0, -1.0, -1.0]
    np.testing.assert_allclose(noisy[order] * signs[:, None], reference, atol=0.05)


def test_align_to_matches_the_reference_loadings(chi):
    first = SusceptibilityPCA(n_components=3).fit(_result(chi))
    flipped = _result(-chi)
    second = SusceptibilityPCA(n_components=3).fit(flipped).align_to(first)
    np.testing.assert_allclose(second.loadings_, first.loadings_, atol=1e-10)
    np.testing.assert_allclose(second.token_scores_, -first.token_scores_, atol=1e-10)


def test_common_basis_pca_equals_a_pca_of_the_stacked_matrices(chi):
    """Against an independent SVD of the stacked, standardized matrices."""
    from susc_callback.analysis.pca import CommonBasisPCA

    later = _result(chi * 1.5 + 0.1 * np.cos(np.arange(chi.size)).reshape(chi.shape))
    first = _result(chi)
    common = CommonBasisPCA(n_components=2).fit([first, later])
    stacked = np.vstack([standardize(first.chi), standardize(later.chi)])
    centred = stacked - stacked.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    for k in range(2):
        assert abs(abs(common.loadings_[k] @ vt[k]) - 1) < 1e-10
    expected_ratio = singular[:2] ** 2 / (singular ** 2).sum()
    assert np.allclose(common.explained_variance_ratio_, expected_ratio)
    scores = np.vstack(common.token_scores_)
    assert np.allclose(np.abs(scores), np.abs(centred @ vt[:2].T))
    d0 = first.token_dataset == 0
    assert np.allclose(common.dataset_scores_[0, 0], common.token_scores_[0][d0].mean(axis=0))


def test_compare_results_is_pearson_per_component(chi):
    from susc_callback.analysis.compare import compare_results

    rng = np.random.default_rng(5)
    noisy = chi + rng.normal(scale=0.5, size=chi.shape)
    correlations = compare_results(_result(chi), _result(noisy))
    for i, name in enumerate(correlations):
        x, y = chi[i] - chi[i].mean(), noisy[i] - noisy[i].mean()
        assert correlations[name] == pytest.approx((x @ y) / np.sqrt((x @ x) * (y @ y)))
    same = compare_results(_result(chi), _result(chi))
    assert all(v == pytest.approx(1.0) for v in same.values())
    other = _result(chi)
    other.token_position = other.token_position + 1
    with pytest.raises(ValueError, match="different probe tokens"):
        compare_results(_result(chi), other)
