"""The engine against closed forms: linear regression with squared loss (Gaussian posterior).

Everything the engine estimates has an exact value here, computed with numpy/scipy only
(nothing from ``susc_callback`` is used to build the ground truth).

Model and losses
----------------
``nn.Linear(3, 2, bias=False)``; ``w = W.reshape(-1)`` (row-major, the engine's flat index
order), p = 6 entries. Per-sample loss ``l_i(w) = 0.5 |y_i - W x_i|^2``, a quadratic
``0.5 w'F_i w + f_i'w + c_i`` with ``F_i = D_i'D_i``, ``f_i = -D_i'y_i``, ``c_i = |y_i|^2/2``,
``D_i = I_2 (x) x_i'``. ``L`` = mean over the N sampling points (quadratic ``F, f, c``);
``w*`` = least squares + an offset (a checkpoint that is not an exact minimizer, so every
linear term below is non-zero); ``phi = L(w) - L(w*)``; ``Delta_x = l_x - L``.

Exact law of the engine's chains
--------------------------------
Full-batch SGLD (batch_size = N), observable = the fixed set of all N points. On the entries
``u`` of a component C (the rest frozen at w*) the update is exactly linear:

    u' = u - (eps/2) A (u - m) + sqrt(eps) xi,     A = n_beta F_CC + gamma I,
    m  = A^{-1} (gamma u* - n_beta (F_{C,-C} v* + f_C))   (minimizer of n_beta L + gamma/2|u-u*|^2)

an AR(1) process ``e' = M e + sqrt(eps) xi`` (e = u - m, M = I - eps A / 2) whose stationary law
is N(m, Sigma) with the discrete Lyapunov equation ``Sigma = M Sigma M' + eps I``: exact for
the discrete chain, no step-size bias. The chains start at u* and the engine draws *before*
each update, so draw t after burn-in B is at e = M^(B+t) (u*-m) + noise; B is chosen so that
``max|eig M|^B < 1e-6`` (the transient is negligible and the simulation below includes it
anyway). Embedding u in w gives w ~ N(mu, S) (S zero outside C).

Gaussian moments of quadratics (Isserlis): for w ~ N(mu, S), f(w) = 0.5 w'Fw + a'w + c0 and
g(w) = 0.5 w'Gw + b'w + d0 (F, G symmetric):

    E f        = 0.5 (tr(F S) + mu'F mu) + a'mu + c0
    Cov(f, g)  = (F mu + a)' S (G mu + b) + 0.5 tr(F S G S)

(write w = mu + z: f - Ef = (F mu + a)'z + 0.5 (z'Fz - tr FS); odd moments vanish and
Cov(z'Fz, z'Gz) = 2 tr(FSGS)). ``test_gaussian_quadratic_moments`` checks both against
1e6 numpy draws. Then, exactly as ESTIMATOR.md defines the estimator,

    chi[C, x]  = -( E_C[phi Delta_x] - E_C[phi] E_full[Delta_x] )
               = -( Cov_C(phi, Delta_x) + E_C[phi] (E_C[Delta_x] - E_full[Delta_x]) )
    mean_phi   = E_C[phi],  rllc = n_beta E_C[phi],  llc_full = n_beta E_full[phi].

Tolerances
----------
The engine's numbers are averages over K chains x T correlated draws. Their sampling
distribution is obtained by running the *same* exact AR(1) chains in numpy (R independent
replicates of the whole estimate, same K, B, T, same estimator formula) -- the standard
error SE is the replicate standard deviation, which accounts for autocorrelation
(effective sample size) without any modelling. Every comparison is |engine - exact| <
Z * SE with Z = 4.5 (two-sided p ~ 7e-6 per comparison, ~2e-5 allowing for the 5% error
of an SE from R = 200 replicates; ~30 comparisons). The engine is seeded, so a run either
always passes or always fails; with 4 chains x 1500 draws the SEs are a few percent of the
larger chi entries (|chi| / SE up to ~15). The replicate
means themselves must match the closed forms within 5 SE / sqrt(R) (a check of the
ground truth). Each test also asserts its own power: a wrong sign (-chi) or factor (2 chi)
of the engine's output would exceed the tolerance.

Fluctuation-dissipation (finite differences)
--------------------------------------------
Reweight sampling point j in the posterior with the probability-preserving perturbation
``L_h = L + h (l_j - L)`` (weights 1 - h + N h [i = j]; a plain weight 1 + h on j alone
would give ``-(n_beta/N) Cov(O, l_j)``, which is not centred). For any fixed observable O,
``d/dh E_h[O] = -n_beta Cov(O, l_j - L)``, and ``d/dh log Z_h = -n_beta E[l_j - L]`` for the
partition function. The engine's chi is the renormalized susceptibility of the
component observable delta(v - v*) phi (primer eq. 34): with Z_C the partition function
of the restricted posterior and Z the full one,

    n_beta chi[C, j] = d/dh E_{C,h}[phi] + E_C[phi] d/dh log(Z_{C,h} / Z_h).

``test_fluctuation_dissipation_closed_form`` checks this identity exactly (Gibbs posterior,
log Z of Gaussian integrals, central differences). ``test_fluctuation_dissipation_engine``
runs the engine with the reweighted posterior at h = +-H_FD with the same seed (common
random numbers: the engine seeds each chain's noise by (seed, component, chain), so the
noise is identical and the difference of the two runs' mean_phi is not swamped by
Monte-Carlo noise; the numpy replicates share their noise across h in the same way), forms
the left-hand side from the engine's mean_phi and compares it with the engine's chi. The
reweighting enters only through the SGLD gradient (``loss_fn`` returns
``l + k (l - l.detach())``: same values, gradient of ``L_h``), so phi, L(w*) and the probe
losses stay the unperturbed observables the identity is about. For the discrete chain the
identity holds only up to O(eps A / 2) (its stationary covariance is
(A - eps A^2 / 4)^{-1}, not A^{-1}); that gap is computed exactly and subtracted.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from conftest import NEEDS_CUDA
from scipy.linalg import solve_discrete_lyapunov
from torch import nn

from susc_callback import Component, ProbeSet, SGLDConfig, estimate_susceptibilities

pytestmark = pytest.mark.slow

D_IN, D_OUT, N = 3, 2, 40
P = D_IN * D_OUT
N_BETA, GAMMA, EPS = 40.0, 40.0, 0.01
CHAINS, BURNIN, DRAWS = 4, 50, 1500
REPLICATES = 200
DATA_SEED, OFFSET = 1, 0.25  # offset of w* from the least-squares solution
H_FD = 0.05  # finite-difference step of the reweighting
Z = 4.5  # tolerance in standard errors
MASK_A = np.array([[True, False, True], [False, True, False]])
COMPONENTS = {"a": MASK_A.reshape(-1), "b": ~MASK_A.reshape(-1), "all": np.ones(P, bool)}
FD_COMPONENTS = ("a", "all")
NUM_SAMPLING_PROBES = 4  # probe rows 0..3 are sampling points 0..3; rows 4, 5 are held out


# -- the problem, in float64 numpy (data rounded to float32 as the engine sees it) -------------

class Quadratic:
    """q(w) = 0.5 w'Fw + a'w + c0 with symmetric F; w may carry leading batch axes."""

    def __init__(self, F, a, c0):
        self.F, self.a, self.c0 = np.asarray(F), np.asarray(a), float(c0)

    def __call__(self, w):
        return 0.5 * np.einsum("...i,ij,...j->...", w, self.F, w) + w @ self.a + self.c0

    def __sub__(self, other):
        return Quadratic(self.F - other.F, self.a - other.a, self.c0 - other.c0)

    def __add__(self, other):
        return Quadratic(self.F + other.F, self.a + other.a, self.c0 + other.c0)

    def scale(self, s):
        return Quadratic(s * self.F, s * self.a, s * self.c0)

    def mean(self, mu, S):
        return 0.5 * (np.trace(self.F @ S) + mu @ self.F @ mu) + self.a @ mu + self.c0

    def cov(self, other, mu, S):
        return ((self.F @ mu + self.a) @ S @ (other.F @ mu + other.a)
                + 0.5 * np.trace(self.F @ S @ other.F @ S))


def sample_loss(x, y):
    D = np.kron(np.eye(D_OUT), x[None, :])  # (D_OUT, P): W x = D w for row-major w
    return Quadratic(D.T @ D, -D.T @ y, 0.5 * y @ y)


class Problem:
    def __init__(self):
        rng = np.random.default_rng(DATA_SEED)
        f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
        w_true = rng.normal(size=(D_OUT, D_IN))
        self.X = f32(rng.normal(size=(N, D_IN)))
        self.Y = f32(self.X @ w_true.T + 0.5 * rng.normal(size=(N, D_OUT)))
        held_x = rng.normal(size=(2, D_IN))
        self.PX = f32(np.concatenate([self.X[:NUM_SAMPLING_PROBES], held_x]))
        self.PY = f32(np.concatenate([self.Y[:NUM_SAMPLING_PROBES],
                                      held_x @ w_true.T + 0.5 * rng.normal(size=(2, D_OUT))]))
        self.losses = [sample_loss(x, y) for x, y in zip(self.X, self.Y)]
        self.L = Quadratic(np.mean([q.F for q in self.losses], 0),
                           np.mean([q.a for q in self.losses], 0),
                           np.mean([q.c0 for q in self.losses]))
        w_ls = np.linalg.solve(self.L.F, -self.L.a)
        self.wstar = f32(w_ls + OFFSET * rng.normal(size=P))
        self.phi = self.L - Quadratic(np.zeros((P, P)), np.zeros(P), self.L(self.wstar))
        self.deltas = [sample_loss(x, y) - self.L for x, y in zip(self.PX, self.PY)]

    def potential(self, j=None, h=0.0):
        """L_h = L + h (l_j - L): the loss the SGLD posterior is built from."""
        return self.L if j is None else self.L + (self.losses[j] - self.L).scale(h)

    def chain_law(self, idx, loss=None, discrete=True):
        """Stationary law of the restricted chain: m, M, Sigma and the embedded (mu, S)."""
        loss = loss or self.L
        C, V = np.flatnonzero(idx), np.flatnonzero(~idx)
        A = N_BETA * loss.F[np.ix_(C, C)] + GAMMA * np.eye(len(C))
        r = GAMMA * self.wstar[C] - N_BETA * (loss.F[np.ix_(C, V)] @ self.wstar[V] + loss.a[C])
        m = np.linalg.solve(A, r)
        M = np.eye(len(C)) - EPS / 2 * A
        # Exact for the discrete chain; the continuous (Gibbs) posterior has Sigma = A^-1.
        Sigma = solve_discrete_lyapunov(M, EPS * np.eye(len(C))) if discrete else np.linalg.inv(A)
        mu = self.wstar.copy()
        mu[C] = m
        S = np.zeros((P, P))
        S[np.ix_(C, C)] = Sigma
        return dict(C=C, A=A, r=r, m=m, M=M, mu=mu, S=S)

    def log_partition(self, idx, loss):
        """log of int exp(-n_beta loss(u, v*) - gamma/2 |u - u*|^2) du (Gaussian integral)."""
        law = self.chain_law(idx, loss, discrete=False)
        C, V = law["C"], np.flatnonzero(~idx)
        v = self.wstar[V]
        c0 = (N_BETA * (0.5 * v @ loss.F[np.ix_(V, V)] @ v + loss.a[V] @ v + loss.c0)
              + 0.5 * GAMMA * self.wstar[C] @ self.wstar[C])
        return (0.5 * law["r"] @ law["m"] - c0 + 0.5 * len(C) * math.log(2 * math.pi)
                - 0.5 * np.linalg.slogdet(law["A"])[1])

    def exact(self, idx, discrete=True):
        """E_C[phi] and chi[C, :] from the closed forms."""
        law = self.chain_law(idx, discrete=discrete)
        full = self.chain_law(np.ones(P, bool), discrete=discrete)
        e_phi = self.phi.mean(law["mu"], law["S"])
        chi = np.array([-(self.phi.cov(d, law["mu"], law["S"])
                          + e_phi * (d.mean(law["mu"], law["S"]) - d.mean(full["mu"], full["S"])))
                        for d in self.deltas])
        return e_phi, chi

    def hybrid_rate(self, idx, j, h):
        """d/dh log(Z_C,h / Z_h) / n_beta by central differences of exact log partitions."""
        full = np.ones(P, bool)
        value = [self.log_partition(idx, self.potential(j, s * h))
                 - self.log_partition(full, self.potential(j, s * h)) for s in (1, -1)]
        return (value[0] - value[1]) / (2 * h * N_BETA)

    def fd_rate(self, idx, j, h, discrete=True):
        """(E_{C,+h}[phi] - E_{C,-h}[phi]) / (2 h n_beta) from the exact laws."""
        means = []
        for s in (1, -1):
            law = self.chain_law(idx, self.potential(j, s * h), discrete=discrete)
            means.append(self.phi.mean(law["mu"], law["S"]))
        return (means[0] - means[1]) / (2 * h * N_BETA)


@pytest.fixture(scope="module")
def problem():
    return Problem()


@pytest.fixture(scope="module")
def fd_point(problem):
    """The sampling point to reweight: the one whose exact chi["all"] is largest."""
    _, chi = problem.exact(COMPONENTS["all"])
    return int(np.argmax(np.abs(chi[:NUM_SAMPLING_PROBES])))


# -- the engine --------------------------------------------------------------------------------

def loss_fn(model, batch):
    """Per-sample squared loss; optional column ``k`` reweights the gradient only."""
    losses = 0.5 * ((batch["y"] - model(batch["x"])) ** 2).sum(-1)
    k = batch.get("k")
    if k is not None:  # value unchanged, gradient of the mean = grad of L + h (l_j - L)
        losses = losses + k * (losses - losses.detach())
    return losses


def engine_inputs(problem):
    """The engine's view of the problem: the linear model at w*, the sampling data and
    the probe (rows 0..3 sampling points, 4 and 5 held out)."""
    model = nn.Linear(D_IN, D_OUT, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(problem.wstar.reshape(D_OUT, D_IN)))
    tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    data = {"x": tensor(problem.X), "y": tensor(problem.Y)}
    probe = ProbeSet.from_batch({"x": tensor(problem.PX), "y": tensor(problem.PY)},
                                datasets=["train"] * NUM_SAMPLING_PROBES + ["held_out"] * 2)
    return model, data, probe


def run_engine(problem, names, j=None, h=0.0, device=None):
    model, data, probe = engine_inputs(problem)
    if j is not None:
        k = torch.full((N,), -h, dtype=torch.float32)
        k[j] += N * h
        data["k"] = k
    components = [Component(n, {"weight": torch.tensor(COMPONENTS[n].reshape(D_OUT, D_IN))},
                            allow_overlap=True) for n in names]
    config = SGLDConfig(step_size=EPS, n_beta=N_BETA, gamma=GAMMA, num_chains=CHAINS,
                        num_draws=DRAWS, num_burnin=BURNIN, batch_size=N, observable="fixed",
                        observable_sequences=N, eval_batch_size=N, seed=0, progress=False,
                        device=device)
    result = estimate_susceptibilities(model, components, data, probe, config, loss_fn=loss_fn)
    assert result.component_names == list(names)
    return result


@pytest.fixture(scope="module")
def engine(problem, fd_point):
    start = time.perf_counter()
    runs = {0: run_engine(problem, list(COMPONENTS))}
    for s in (1, -1):  # same seed: common random numbers
        runs[s] = run_engine(problem, list(FD_COMPONENTS), fd_point, s * H_FD)
    print(f"engine runs: {time.perf_counter() - start:.1f}s")
    return runs


# -- the exact chains, simulated in numpy: the estimator's sampling distribution ---------------

def simulate(problem, idx, losses, seed):
    """R replicates of the engine's estimate from the exact AR(1) chains of component idx.

    One chain per potential in ``losses``, all driven by the same noise (as the engine's
    runs with the same seed). Returns pooled means over the K x T draws: E[phi] per
    potential (len(losses), R), and for the first potential E[phi Delta] and E[Delta]
    (R, P_probe).
    """
    rng = np.random.default_rng(seed)
    laws = [problem.chain_law(idx, loss) for loss in losses]
    C = laws[0]["C"]
    m = np.stack([law["m"] for law in laws])[:, None, None]  # (H, 1, 1, |C|)
    M = np.stack([law["M"] for law in laws])
    G = np.stack([d.F for d in problem.deltas])
    g = np.stack([d.a for d in problem.deltas])
    g0 = np.array([d.c0 for d in problem.deltas])
    u = np.broadcast_to(problem.wstar[C], (len(laws), REPLICATES, CHAINS, len(C))).copy()
    w = np.broadcast_to(problem.wstar, (len(laws), REPLICATES, CHAINS, P)).copy()
    sum_phi = np.zeros((len(laws), REPLICATES))
    sum_phi_delta = np.zeros((REPLICATES, len(g0)))
    sum_delta = np.zeros((REPLICATES, len(g0)))
    for step in range(BURNIN + DRAWS):
        if step >= BURNIN:  # the engine draws before the update
            w[..., C] = u
            phi = problem.phi(w)
            delta = (0.5 * np.einsum("rki,pij,rkj->rkp", w[0], G, w[0]) + w[0] @ g.T + g0)
            sum_phi += phi.sum(-1)
            sum_phi_delta += (phi[0][..., None] * delta).sum(1)
            sum_delta += delta.sum(1)
        noise = rng.standard_normal((REPLICATES, CHAINS, len(C)))
        u = m + np.einsum("hij,hrkj->hrki", M, u - m) + math.sqrt(EPS) * noise
    count = CHAINS * DRAWS
    return sum_phi / count, sum_phi_delta / count, sum_delta / count


@pytest.fixture(scope="module")
def replicates(problem, fd_point):
    """Per-replicate engine outputs (chi, mean_phi, llc_full, FD quantities)."""
    start = time.perf_counter()
    out = {"chi": {}, "mean_phi": {}, "fd": {}}
    full_phi, _, full_delta = simulate(problem, np.ones(P, bool), [problem.L], seed=1000)
    out["llc_full"] = N_BETA * full_phi[0]
    for seed, (name, idx) in enumerate(COMPONENTS.items()):
        losses = [problem.L]
        if name in FD_COMPONENTS:
            losses += [problem.potential(fd_point, H_FD), problem.potential(fd_point, -H_FD)]
        phi, phi_delta, _ = simulate(problem, idx, losses, seed)
        out["chi"][name] = -(phi_delta - phi[0][:, None] * full_delta)
        out["mean_phi"][name] = phi[0]
        if name in FD_COMPONENTS:
            out["fd"][name] = (phi[1] - phi[2]) / (2 * H_FD * N_BETA)
    print(f"numpy replicates: {time.perf_counter() - start:.1f}s")
    return out


def se(samples):
    return np.std(samples, axis=0, ddof=1)


# -- tests -------------------------------------------------------------------------------------

def test_gaussian_quadratic_moments():
    """The Isserlis formulas used above, against 1e6 draws (within 5 Monte-Carlo SE)."""
    rng = np.random.default_rng(7)
    n = 4
    B = rng.normal(size=(n, n))
    S = B @ B.T / n
    mu = rng.normal(size=n)
    sym = lambda X: (X + X.T) / 2  # noqa: E731
    f = Quadratic(sym(rng.normal(size=(n, n))), rng.normal(size=n), 0.3)
    g = Quadratic(sym(rng.normal(size=(n, n))), rng.normal(size=n), -1.0)
    w = rng.multivariate_normal(mu, S, size=1_000_000)
    fw, gw = f(w), g(w)
    assert abs(fw.mean() - f.mean(mu, S)) < 5 * fw.std() / 1e3
    centred = (fw - fw.mean()) * (gw - gw.mean())
    assert abs(centred.mean() - f.cov(g, mu, S)) < 5 * centred.std() / 1e3
    assert abs(f.cov(f, mu, S) - fw.var()) < 5 * ((fw - fw.mean()) ** 2).std() / 1e3


def test_ground_truth_is_consistent(problem, replicates):
    """The simulated chains reproduce the closed forms (Lyapunov law, burn-in, estimator)."""
    full = problem.chain_law(np.ones(P, bool))
    for name, idx in COMPONENTS.items():
        law = problem.chain_law(idx)
        assert np.max(np.abs(np.linalg.eigvals(law["M"]))) ** BURNIN < 1e-6  # no transient
        e_phi, chi = problem.exact(idx)
        sim = replicates["chi"][name]
        np.testing.assert_array_less(np.abs(sim.mean(0) - chi),
                                     5 * se(sim) / math.sqrt(REPLICATES))
        sim_phi = replicates["mean_phi"][name]
        assert abs(sim_phi.mean() - e_phi) < 5 * se(sim_phi) / math.sqrt(REPLICATES)
    e_full = N_BETA * problem.phi.mean(full["mu"], full["S"])
    assert abs(replicates["llc_full"].mean() - e_full) < \
        5 * se(replicates["llc_full"]) / math.sqrt(REPLICATES)


def test_engine_matches_closed_form(problem, engine, replicates):
    """chi, mean_phi, rllc, llc_full and L(w*) of the engine against the exact values."""
    assert_matches_closed_form(problem, engine[0], replicates)


@NEEDS_CUDA
def test_engine_matches_closed_form_on_cuda(problem, replicates):
    """The same on a GPU (its own noise streams, so other draws, same tolerances)."""
    assert_matches_closed_form(problem, run_engine(problem, list(COMPONENTS), device="cuda"),
                               replicates)


def assert_matches_closed_form(problem, result, replicates):
    for row, (name, idx) in enumerate(COMPONENTS.items()):
        e_phi, chi = problem.exact(idx)
        chi_se = se(replicates["chi"][name])
        error = np.abs(result.chi[row] - chi)
        print(f"{name}: chi exact {np.round(chi, 6)}\n   engine {np.round(result.chi[row], 6)}"
              f"\n   |err|/SE {np.round(error / chi_se, 2)}")
        np.testing.assert_array_less(error, Z * chi_se)
        # power: a sign or factor-2 error in chi would be caught
        for wrong in (-result.chi[row], 2 * result.chi[row]):
            assert np.any(np.abs(wrong - chi) > Z * chi_se)
        phi_se = se(replicates["mean_phi"][name])
        print(f"   mean_phi exact {e_phi:.6f} engine {result.mean_phi[row]:.6f} "
              f"|err|/SE {abs(result.mean_phi[row] - e_phi) / phi_se:.2f}")
        assert abs(result.mean_phi[row] - e_phi) < Z * phi_se
        assert abs(result.rllc[row] - N_BETA * e_phi) < Z * N_BETA * phi_se
        assert abs(-result.mean_phi[row] - e_phi) > Z * phi_se
        assert result.anchor_loss[row] == pytest.approx(problem.L(problem.wstar), rel=1e-5)
    full = problem.chain_law(np.ones(P, bool))
    llc = N_BETA * problem.phi.mean(full["mu"], full["S"])
    llc_se = se(replicates["llc_full"])
    print(f"llc_full exact {llc:.5f} engine {result.llc_full:.5f} "
          f"|err|/SE {abs(result.llc_full - llc) / llc_se:.2f}")
    assert abs(result.llc_full - llc) < Z * llc_se
    # the hybrid baseline matters here: without it chi would be off by many SE
    law = problem.chain_law(COMPONENTS["a"])
    no_baseline = np.array([-problem.phi.cov(d, law["mu"], law["S"]) for d in problem.deltas])
    assert np.any(np.abs(no_baseline - problem.exact(COMPONENTS["a"])[1])
                  > 2 * Z * se(replicates["chi"]["a"]))


def test_fluctuation_dissipation_closed_form(problem):
    """Exact identity: n_beta chi = d/dh E_C,h[phi] + E_C[phi] d/dh log(Z_C,h / Z_h).

    Gibbs posterior (Sigma = A^-1), central differences of exact Gaussian expectations and
    log partition functions, versus the covariance form of chi (Isserlis).
    """
    h = 1e-4
    for name, idx in COMPONENTS.items():
        e_phi, chi = problem.exact(idx, discrete=False)
        for j in range(NUM_SAMPLING_PROBES):
            fd = problem.fd_rate(idx, j, h, discrete=False)
            derivative = fd + e_phi * problem.hybrid_rate(idx, j, h)
            assert derivative == pytest.approx(chi[j], rel=1e-5, abs=1e-10), (name, j)
            assert abs(-derivative - chi[j]) > 0.5 * abs(chi[j])  # a sign error is caught
            if name != "all":  # the hybrid term is needed for a strict component
                assert abs(fd - chi[j]) > 1e-3 * abs(chi[j]), (name, j)


def test_fluctuation_dissipation_engine(problem, engine, replicates, fd_point):
    """Reweight sampling point j, re-run with the same seed: the change of the engine's
    mean_phi (plus the exact partition-function term) reproduces the engine's chi."""
    j = fd_point
    for name in FD_COMPONENTS:
        idx = COMPONENTS[name]
        row0 = list(COMPONENTS).index(name)
        row = list(FD_COMPONENTS).index(name)
        e_phi, chi = problem.exact(idx)
        hybrid = problem.hybrid_rate(idx, j, H_FD)  # exactly 0 for "all" (Z_C = Z)
        # 1. the response of E_C[phi] to the reweighting, against the exact laws
        fd = (engine[1].mean_phi[row] - engine[-1].mean_phi[row]) / (2 * H_FD * N_BETA)
        fd_exact = problem.fd_rate(idx, j, H_FD)
        fd_se = se(replicates["fd"][name])
        print(f"{name}: d/dh E[phi]/n_beta exact {fd_exact:.6f} engine {fd:.6f} "
              f"|err|/SE {abs(fd - fd_exact) / fd_se:.2f}")
        assert abs(fd - fd_exact) < Z * fd_se
        assert abs(-fd - fd_exact) > Z * fd_se
        # 2. the finite-difference susceptibility against the engine's own chi
        chi_engine = engine[0].chi[row0, j]
        from_fd = fd + engine[0].mean_phi[row0] * hybrid
        gap = problem.fd_rate(idx, j, H_FD) + e_phi * hybrid - chi[j]  # O(eps A) + O(h^2)
        sim = replicates["fd"][name] + replicates["mean_phi"][name] * hybrid \
            - replicates["chi"][name][:, j]
        tolerance = Z * se(sim)
        print(f"   chi from FD {from_fd:.6f}, engine chi {chi_engine:.6f}, exact chi "
              f"{chi[j]:.6f}, exact gap {gap:.6f}, "
              f"|err|/SE {abs(from_fd - chi_engine - gap) / se(sim):.2f}")
        assert abs(from_fd - chi_engine - gap) < tolerance
        for wrong in (-chi_engine, 2 * chi_engine):
            assert abs(from_fd - wrong - gap) > tolerance


def test_localisation_share_matches_the_chain_law(problem, engine):
    """gamma (1 - eps gamma / 4) E|u - u*|^2 / d, with E|u - u*|^2 = tr(Sigma) + |m - u*|^2
    under the exact stationary law, for every component and the full chain; the SE from R
    replicates of the exact AR(1) chains (same K, B, T). On the localisation alone the
    discrete chain's Sigma is I / (gamma (1 - eps gamma / 4)): a share of exactly 1."""
    result = engine[0]
    rng = np.random.default_rng(99)
    for name, idx in [*COMPONENTS.items(), ("full", np.ones(P, bool))]:
        law = problem.chain_law(idx)
        C = law["C"]
        scale = GAMMA * (1 - EPS * GAMMA / 4) / len(C)
        exact = scale * (np.trace(law["S"]) + np.sum((law["m"] - problem.wstar[C]) ** 2))
        u = np.broadcast_to(problem.wstar[C], (REPLICATES, CHAINS, len(C))).copy()
        total = np.zeros(REPLICATES)
        for step in range(BURNIN + DRAWS):
            if step >= BURNIN:
                total += ((u - problem.wstar[C]) ** 2).sum(-1).sum(-1)
            u = law["m"] + (u - law["m"]) @ law["M"].T \
                + math.sqrt(EPS) * rng.standard_normal(u.shape)
        simulated = scale * len(C) * total / (CHAINS * DRAWS * len(C))
        share_se = se(simulated)
        found = result.full_localisation if name == "full" else \
            result.localisation[list(COMPONENTS).index(name)]
        print(f"{name}: localisation share exact {exact:.4f} engine {found:.4f} "
              f"|err|/SE {abs(found - exact) / share_se:.2f}")
        assert abs(simulated.mean() - exact) < 5 * share_se / math.sqrt(REPLICATES)
        assert abs(found - exact) < Z * share_se
        assert 0 < exact < 1 and abs(2 * found - exact) > Z * share_se
    pure = solve_discrete_lyapunov(np.eye(2) * (1 - EPS * GAMMA / 2), EPS * np.eye(2))
    assert GAMMA * (1 - EPS * GAMMA / 4) * np.trace(pure) / 2 == pytest.approx(1.0)
