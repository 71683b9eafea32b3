"""The influence matrix against its closed form on the Gaussian linear-regression posterior.

The problem, the exact chain laws and the Isserlis covariance of two quadratics are those
of ``test_closed_form.py`` (numpy only). Under the stationary law N(mu, S) of a chain
(restricted to a component, or the full chain), ``influence[i, x] = -Cov(l_i, l_x)`` with
``Cov`` the Isserlis formula for the per-sample quadratic losses. The training rows are
sampling points 0..3 and the queries the two held-out points.

Tolerance: the engine pools K chains x T correlated draws; the standard error of that
estimate comes from R replicates of the same exact AR(1) chains simulated in numpy (same
K, burn-in, T and estimator), which accounts for the autocorrelation. Every entry must be
within Z = 4.5 SE (as in test_closed_form.py), the replicates' mean within 5 SE / sqrt(R)
of the closed form (a check of the ground truth), and a sign error of the engine must be
caught.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_closed_form import (
    BURNIN,
    CHAINS,
    COMPONENTS,
    D_IN,
    D_OUT,
    DRAWS,
    EPS,
    GAMMA,
    N_BETA,
    NUM_SAMPLING_PROBES,
    REPLICATES,
    N,
    P,
    Problem,
    Z,
    loss_fn,
    sample_loss,
)
from torch import nn

from susc_callback import Component, SGLDConfig
from susc_callback.influence import estimate_influence

pytestmark = pytest.mark.slow
POSTERIORS = {"full": np.ones(P, bool), **{n: COMPONENTS[n] for n in ("a", "b")}}


@pytest.fixture(scope="module")
def problem():
    return Problem()


def probe_losses(problem):
    return [sample_loss(x, y) for x, y in zip(problem.PX, problem.PY)]


def exact_influence(problem, idx):
    law = problem.chain_law(idx)
    losses = probe_losses(problem)
    train, queries = losses[:NUM_SAMPLING_PROBES], losses[NUM_SAMPLING_PROBES:]
    return np.array([[-a.cov(b, law["mu"], law["S"]) for b in queries] for a in train]), \
        np.array([a.cov(a, law["mu"], law["S"]) for a in train])


def simulated_influence(problem, idx, seed):
    """(R, I, J) influence and (R, I) variances of R replicates of the engine's estimate."""
    rng = np.random.default_rng(seed)
    law = problem.chain_law(idx)
    C, m, M = law["C"], law["m"], law["M"]
    losses = probe_losses(problem)
    G = np.stack([q.F for q in losses])
    g = np.stack([q.a for q in losses])
    g0 = np.array([q.c0 for q in losses])
    u = np.broadcast_to(problem.wstar[C], (REPLICATES, CHAINS, len(C))).copy()
    w = np.broadcast_to(problem.wstar, (REPLICATES, CHAINS, P)).copy()
    total = np.zeros((REPLICATES, len(losses)))
    products = np.zeros((REPLICATES, len(losses), len(losses)))
    for step in range(BURNIN + DRAWS):
        if step >= BURNIN:
            w[..., C] = u
            values = 0.5 * np.einsum("rki,pij,rkj->rkp", w, G, w) + w @ g.T + g0
            total += values.sum(1)
            products += np.einsum("rkp,rkq->rpq", values, values)
        noise = rng.standard_normal((REPLICATES, CHAINS, len(C)))
        u = m + (u - m) @ M.T + math.sqrt(EPS) * noise
    count = CHAINS * DRAWS
    mean = total / count
    cov = products / count - mean[:, :, None] * mean[:, None, :]
    train = slice(0, NUM_SAMPLING_PROBES)
    queries = slice(NUM_SAMPLING_PROBES, len(losses))
    return -cov[:, train, queries], np.einsum("rii->ri", cov)[:, train]


@pytest.fixture(scope="module")
def engine(problem):
    model = nn.Linear(D_IN, D_OUT, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(problem.wstar.reshape(D_OUT, D_IN)))
    tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    data = {"x": tensor(problem.X), "y": tensor(problem.Y)}
    train = {"x": tensor(problem.PX[:NUM_SAMPLING_PROBES]),
             "y": tensor(problem.PY[:NUM_SAMPLING_PROBES])}
    queries = {"x": tensor(problem.PX[NUM_SAMPLING_PROBES:]),
               "y": tensor(problem.PY[NUM_SAMPLING_PROBES:])}
    components = [Component(n, {"weight": torch.tensor(POSTERIORS[n].reshape(D_OUT, D_IN))},
                            allow_overlap=True) for n in ("a", "b")]
    config = SGLDConfig(step_size=EPS, n_beta=N_BETA, gamma=GAMMA, num_chains=CHAINS,
                        num_draws=DRAWS, num_burnin=BURNIN, batch_size=N, observable="fixed",
                        observable_sequences=N, eval_batch_size=N, seed=0, progress=False)
    return estimate_influence(model, train, queries, config, components=components,
                              sampling_data=data, loss_fn=loss_fn)


@pytest.mark.parametrize("posterior", list(POSTERIORS))
def test_influence_matches_closed_form(problem, engine, posterior):
    idx = POSTERIORS[posterior]
    exact, exact_variance = exact_influence(problem, idx)
    seed = 11 + list(POSTERIORS).index(posterior)
    simulated, simulated_variance = simulated_influence(problem, idx, seed)
    spread = np.std(simulated, axis=0, ddof=1)
    np.testing.assert_array_less(np.abs(simulated.mean(0) - exact),
                                 5 * spread / math.sqrt(REPLICATES))
    k = engine.posterior_names.index(posterior)
    error = np.abs(engine.influence[k] - exact)
    print(f"{posterior}: exact {np.round(exact, 5).tolist()}\n engine "
          f"{np.round(engine.influence[k], 5).tolist()}\n |err|/SE {np.round(error / spread, 2)}")
    np.testing.assert_array_less(error, Z * spread)
    assert np.any(np.abs(-engine.influence[k] - exact) > Z * spread)  # a sign error shows
    variance_spread = np.std(simulated_variance, axis=0, ddof=1)
    np.testing.assert_array_less(np.abs(engine.train_variance[k] - exact_variance),
                                 Z * variance_spread)
    np.testing.assert_allclose(engine.self_influence[k], -engine.train_variance[k])
    assert engine.draws[k] == CHAINS * DRAWS


def test_the_restricted_posteriors_differ(problem):
    """The check above has power to tell the posteriors apart: the exact matrices of the
    components differ from the full posterior's by many standard errors."""
    full, _ = exact_influence(problem, POSTERIORS["full"])
    for name in ("a", "b"):
        restricted, _ = exact_influence(problem, POSTERIORS[name])
        spread = np.std(simulated_influence(problem, POSTERIORS[name], seed=5)[0], axis=0)
        assert np.max(np.abs(restricted - full) / spread) > 3 * Z
