"""Patterning's inverse against independent computations: a generic least-squares solver on
random low-rank susceptibilities, and exact Gaussian posteriors (the closed forms of
test_closed_form.py) for the first-order effect of the weights."""

from __future__ import annotations

import numpy as np
import pytest
from test_closed_form import COMPONENTS, N_BETA, N, Problem, Quadratic

from susc_callback import SusceptibilityPCA, SusceptibilityResult
from susc_callback.patterning import plan_patterning

NAMES = ["l0h0", "l0h1", "l0h2", "l1h0", "l1h1", "l1h2"]
SEQUENCES, PER_SEQUENCE = 5, 8


def synthetic(chi_covariance: np.ndarray, n_beta: float = 10.0) -> SusceptibilityResult:
    """A result on 5 probe sequences x 8 tokens, datasets a, a, b, b, c."""
    components, tokens = chi_covariance.shape
    sequences = np.repeat(np.arange(tokens // PER_SEQUENCE), PER_SEQUENCE)
    datasets = ["a", "a", "b", "b", "c"][:tokens // PER_SEQUENCE]
    return SusceptibilityResult(
        component_names=list(NAMES[:components]), chi=chi_covariance * 1.5,
        dataset_names=sorted(set(datasets)), dataset_chi=np.zeros((components, 3)),
        rllc=np.zeros(components), llc_full=0.0, mean_phi=np.ones(components),
        anchor_loss=np.zeros(components), loss_traces=np.zeros((components, 1, 2)),
        full_loss_trace=np.zeros((1, 2)), token_sequence=sequences,
        token_position=np.tile(np.arange(PER_SEQUENCE), tokens // PER_SEQUENCE),
        probe_input_ids=np.zeros((len(datasets), PER_SEQUENCE + 1), np.int64),
        probe_attention_mask=np.ones((len(datasets), PER_SEQUENCE + 1), np.int64),
        sequence_datasets=datasets, config={"n_beta": n_beta},
        chi_covariance=chi_covariance)


@pytest.fixture
def low_rank():
    rng = np.random.default_rng(0)
    left, right = rng.normal(size=(6, 3)), rng.normal(size=(3, SEQUENCES * PER_SEQUENCE))
    return synthetic(left @ np.diag([3.0, 1.0, 0.3]) @ right * 0.01)


def design(result, granularity):
    """The tokens x groups indicator and the centred Jacobian, built from the definitions."""
    key = {"token": np.arange(len(result.token_sequence)), "sequence": result.token_sequence,
           "dataset": result.token_dataset}[granularity]
    groups = np.unique(key)
    indicator = (key[:, None] == groups[None, :]).astype(float)
    x = result.chi_covariance - result.chi_covariance.mean(axis=1, keepdims=True)
    return indicator, result.config["n_beta"] / len(key) * x @ indicator


@pytest.mark.parametrize("granularity", ["token", "sequence", "dataset"])
def test_ridge_solution_is_the_least_squares_minimiser(low_rank, granularity):
    """v = argmin |J v - target|^2 + lam |A v|^2 (penalty on the token weights), from a
    generic solver on the stacked system; the dataset weights are the token problem
    restricted to weights constant on each dataset."""
    target = np.array([1.0, -0.5, 0.0, 0.2, 0.0, 0.3])
    plan = plan_patterning(low_rank, target, granularity=granularity, ridge=0.05)
    indicator, jacobian = design(low_rank, granularity)
    stacked = np.vstack([jacobian, np.sqrt(plan.ridge) * indicator])
    expected = np.linalg.lstsq(stacked, np.concatenate([target, np.zeros(len(indicator))]),
                               rcond=None)[0]
    np.testing.assert_allclose(plan.direction, expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(plan.token_weights, (plan.weights @ indicator.T))
    assert plan.ridge == pytest.approx(0.05 * np.linalg.svd(
        jacobian / np.sqrt(indicator.sum(0)), compute_uv=False)[0] ** 2)


def test_the_kept_modes_reproduce_the_target(low_rank):
    _, jacobian = design(low_rank, "token")
    u, s, _ = np.linalg.svd(jacobian, full_matrices=False)
    reachable = u[:, :3] @ np.array([1.0, -2.0, 0.5])
    plan = plan_patterning(low_rank, reachable, ridge=1e-12)
    np.testing.assert_allclose(jacobian @ plan.direction, reachable, rtol=1e-6, atol=1e-9)
    anything = np.arange(6.0)
    projection = u[:, :3] @ u[:, :3].T @ anything  # only the span of the modes is reachable
    plan = plan_patterning(low_rank, anything, ridge=1e-12)
    np.testing.assert_allclose(jacobian @ plan.direction, projection, rtol=1e-6, atol=1e-9)
    plan = plan_patterning(low_rank, anything, ridge=1e-12, rank=1)
    np.testing.assert_allclose(jacobian @ plan.direction, u[:, :1] @ u[:, :1].T @ anything,
                               rtol=1e-6, atol=1e-9)


def test_weights_step_size_clipping_and_prediction(low_rank):
    target = {"l0h1": 1.0}
    plan = plan_patterning(low_rank, target, max_change=0.5)
    assert np.abs(plan.weights - 1).max() == pytest.approx(0.5) and plan.clipped == 0
    _, jacobian = design(low_rank, "token")
    np.testing.assert_allclose(plan.predicted,
                               jacobian @ (plan.weights - 1) / plan.weights.mean())
    bold = plan_patterning(low_rank, target, alpha=40 * plan.alpha)
    assert bold.clipped == int((1 + bold.alpha * bold.direction < 0).sum()) > 0
    assert bold.weights.min() == 0.0
    small = plan_patterning(low_rank, target, max_change=1e-6)  # first order: alpha J v
    np.testing.assert_allclose(small.predicted, small.alpha * jacobian @ small.direction,
                               rtol=1e-5)


def test_a_principal_component_as_target(low_rank):
    plan = plan_patterning(low_rank, ("PC2", -2.0))
    pca = SusceptibilityPCA(2).fit(low_rank)
    np.testing.assert_allclose(plan.target, -2.0 * pca.loadings_[1])
    np.testing.assert_allclose(plan_patterning(low_rank, "PC1").target, pca.loadings_[0])


@pytest.mark.parametrize("target, options, message", [
    ({"l9h9": 1.0}, {}, r"Target names \['l9h9'\], not components"),
    ({"l0h1": 1.0}, {"failed": True}, r"failed components \['l0h1'\]"),
    (np.ones(4), {}, "one finite value per finite component"),
    (np.full(6, np.nan), {}, "one finite value per finite component"),
    ("PC9", {}, "has only 6 PCs"),
    ("banana", {}, "Invalid target 'banana'"),
    ({"l0h0": 1.0}, {"ridge": 0.0}, "Invalid ridge 0.0"),
    ({"l0h0": 1.0}, {"granularity": "word"}, "Invalid granularity 'word'"),
    ({"l0h0": 1.0}, {"rank": 0}, "Invalid rank 0"),
])
def test_bad_input_is_named(low_rank, target, options, message):
    if options.pop("failed", False):
        low_rank.chi[1] = np.nan
        low_rank.chi_covariance[1] = np.nan
        low_rank.failed["l0h1"] = "diverged"
    with pytest.raises(ValueError, match=message):
        plan_patterning(low_rank, target, **options)


# -- first order, exactly: a Gaussian posterior ------------------------------------------------

def exact_result(problem: Problem, names: list[str]) -> SusceptibilityResult:
    """The closed-form result with the N sampling points as the pool (one token each)."""
    covariance, chi, mean_phi = [], [], []
    deltas = [loss - problem.L for loss in problem.losses]
    for name in names:
        law = problem.chain_law(COMPONENTS[name], discrete=False)
        covariance.append([-problem.phi.cov(d, law["mu"], law["S"]) for d in deltas])
        mean_phi.append(problem.phi.mean(law["mu"], law["S"]))
    full = problem.chain_law(np.ones(len(problem.wstar), bool), discrete=False)
    for name, e_phi in zip(names, mean_phi):
        law = problem.chain_law(COMPONENTS[name], discrete=False)
        chi.append([-(problem.phi.cov(d, law["mu"], law["S"]) + e_phi * (
            d.mean(law["mu"], law["S"]) - d.mean(full["mu"], full["S"]))) for d in deltas])
    result = synthetic(np.array(covariance), n_beta=N_BETA)
    result.component_names, result.chi = list(names), np.array(chi)
    result.token_sequence, result.token_position = np.arange(N), np.zeros(N, np.int64)
    result.probe_input_ids = np.zeros((N, 2), np.int64)
    result.probe_attention_mask = np.ones((N, 2), np.int64)
    result.sequence_datasets, result.dataset_names = ["pool"] * N, ["pool"]
    result.mean_phi = np.array(mean_phi)
    return result


def realised_change(problem: Problem, name: str, weights: np.ndarray) -> float:
    """E_C[phi] under the normalised weighted loss minus E_C[phi] unweighted (Gibbs)."""

    share = weights / weights.sum()
    loss = Quadratic(sum(s * q.F for s, q in zip(share, problem.losses)),
                     sum(s * q.a for s, q in zip(share, problem.losses)),
                     sum(s * q.c0 for s, q in zip(share, problem.losses)))
    moved = problem.chain_law(COMPONENTS[name], loss, discrete=False)
    base = problem.chain_law(COMPONENTS[name], discrete=False)
    return problem.phi.mean(moved["mu"], moved["S"]) - problem.phi.mean(base["mu"], base["S"])


def test_weights_move_the_exact_posterior_as_predicted():
    """Reweighting the sampling data by 1 + alpha v moves E_C[phi] by the plan's prediction
    to first order: central differences in alpha of the exact Gaussian expectations agree
    to 1e-4. The full chi (with its renormalisation term) would predict something else for
    a strict component: the test would catch using it."""
    problem = Problem()
    result = exact_result(problem, ["a", "b", "all"])
    plan = plan_patterning(result, {"a": 1.0, "b": -0.5}, max_change=1e-3)
    for row, name in enumerate(result.component_names):
        plus = realised_change(problem, name, 1 + plan.alpha * plan.direction)
        minus = realised_change(problem, name, 1 - plan.alpha * plan.direction)
        assert (plus - minus) / 2 == pytest.approx(plan.predicted[row], rel=1e-4), name
    with_chi = plan_patterning(result, {"a": 1.0, "b": -0.5}, max_change=1e-3,
                               susceptibility="chi")
    plus = realised_change(problem, "a", 1 + with_chi.alpha * with_chi.direction)
    minus = realised_change(problem, "a", 1 - with_chi.alpha * with_chi.direction)
    assert abs((plus - minus) / 2 - with_chi.predicted[0]) > 1e-2 * abs(with_chi.predicted[0])
