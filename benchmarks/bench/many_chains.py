"""The "many-chains" workload: many chains on a model of 6 parameters (issue 21).

Gaussian linear regression (``nn.Linear(3, 2, bias=False)``, squared loss, 200 sampling
points, full batch), three components (two masked slices of the weight and the whole
weight) plus the full chain, 256 chains x 2000 draws every 10 steps after a burn-in of
400. Its posterior is Gaussian, so every chain's stationary law and every susceptibility
has a closed form (the discrete chain's Lyapunov covariance and Isserlis moments, as in
``tests/test_closed_form.py``, written again here in numpy).

Three tools, side by side in one process:

* the engine (``estimate_susceptibilities``);
* the floor: a plain torch loop that advances every chain of every component at once as
  one ``(chains, 2, 3)`` batch (one forward, one backward, one update and one set of
  running sums per step), the arithmetic the estimate needs and nothing else;
* devinterp 2.0.1's ``susceptibilities()`` (optional).

The engine and devinterp can be run with fewer chains and draws than the workload's
(``--mc-engine-chains``, ``--mc-engine-draws``, ``--mc-devinterp-*``): their times are then
scaled up linearly in chain-steps, and the output says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import solve_discrete_lyapunov

D_IN, D_OUT, N = 3, 2, 200
P = D_IN * D_OUT
EPS, N_BETA, GAMMA = 0.01, 40.0, 40.0
CHAINS, DRAWS, EVERY, BURNIN = 256, 2000, 10, 400
SAMPLING_PROBES, HELD_OUT_PROBES = 16, 8
MASK_A = np.array([[True, False, True], [False, True, False]]).reshape(-1)
MASKS = {"a": MASK_A, "b": ~MASK_A, "weight": np.ones(P, bool)}


@dataclass
class Regression:
    """The data, the checkpoint ``w*`` (least squares + an offset) and the probe points."""

    x: np.ndarray
    y: np.ndarray
    wstar: np.ndarray
    probe_x: np.ndarray
    probe_y: np.ndarray

    @classmethod
    def make(cls, seed: int = 1) -> Regression:
        rng = np.random.default_rng(seed)
        f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
        w_true = rng.normal(size=(D_OUT, D_IN))
        x = f32(rng.normal(size=(N, D_IN)))
        y = f32(x @ w_true.T + 0.5 * rng.normal(size=(N, D_OUT)))
        held = rng.normal(size=(HELD_OUT_PROBES, D_IN))
        probe_x = f32(np.concatenate([x[:SAMPLING_PROBES], held]))
        probe_y = f32(np.concatenate([y[:SAMPLING_PROBES], held @ w_true.T
                                      + 0.5 * rng.normal(size=(HELD_OUT_PROBES, D_OUT))]))
        w_ls = np.linalg.lstsq(x, y, rcond=None)[0].T.reshape(-1)
        return cls(x, y, f32(w_ls + 0.25 * rng.normal(size=P)), probe_x, probe_y)

    def quadratic(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """``0.5 w'Fw + a'w + c`` of the mean loss over the points ``(x, y)``."""
        design = np.stack([np.kron(np.eye(D_OUT), xi[None, :]) for xi in x])  # (n, 2, P)
        F = np.einsum("nij,nik->jk", design, design) / len(x)
        a = -np.einsum("nij,ni->j", design, y) / len(x)
        return F, a, 0.5 * float((y ** 2).sum(-1).mean())

    def exact_chi(self) -> dict[str, np.ndarray]:
        """chi[C, probe] of every component from the chains' exact stationary laws."""
        F, a, c = self.quadratic(self.x, self.y)
        wstar = self.wstar

        def law(mask):
            C, V = np.flatnonzero(mask), np.flatnonzero(~mask)
            A = N_BETA * F[np.ix_(C, C)] + GAMMA * np.eye(len(C))
            m = np.linalg.solve(A, GAMMA * wstar[C] - N_BETA * (F[np.ix_(C, V)] @ wstar[V]
                                                                + a[C]))
            M = np.eye(len(C)) - EPS / 2 * A
            mu, S = wstar.copy(), np.zeros((P, P))
            mu[C], S[np.ix_(C, C)] = m, solve_discrete_lyapunov(M, EPS * np.eye(len(C)))
            return mu, S

        def mean(q, mu, S):
            return 0.5 * (np.trace(q[0] @ S) + mu @ q[0] @ mu) + q[1] @ mu + q[2]

        def cov(q, r, mu, S):
            return (q[0] @ mu + q[1]) @ S @ (r[0] @ mu + r[1]) + 0.5 * np.trace(
                q[0] @ S @ r[0] @ S)

        L = (F, a, c)
        phi = (F, a, c - mean(L, wstar, np.zeros((P, P))))
        deltas = []
        for xi, yi in zip(self.probe_x, self.probe_y):
            Fi, ai, ci = self.quadratic(xi[None], yi[None])
            deltas.append((Fi - F, ai - a, ci - c))
        full = law(np.ones(P, bool))
        out = {}
        for name, mask in MASKS.items():
            mu, S = law(mask)
            e_phi = mean(phi, mu, S)
            out[name] = np.array([-(cov(phi, d, mu, S) + e_phi * (mean(d, mu, S)
                                                                   - mean(d, *full)))
                                  for d in deltas])
        return out


def _tensor(a: np.ndarray, device: str) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32, device=device)


def run_floor(problem: Regression, chains: int, draws: int, device: str, seed: int = 0
              ) -> dict[str, np.ndarray]:
    """The vectorised floor: every chain of every component (and the full chain) as one
    batch of ``(components + 1) * chains`` weight matrices, advanced together."""
    names = [*MASKS, "full"]
    masks = torch.stack([_tensor(MASKS[n] if n in MASKS else np.ones(P), device)
                         for n in names]).repeat_interleave(chains, 0).view(-1, D_OUT, D_IN)
    x, y = _tensor(problem.x, device), _tensor(problem.y, device)
    px, py = _tensor(problem.probe_x, device), _tensor(problem.probe_y, device)
    wstar = _tensor(problem.wstar, device).view(1, D_OUT, D_IN)
    w = wstar.repeat(len(masks), 1, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
    sums = {"phi": zeros(len(masks)), "loss": zeros(len(masks)), "phi_loss": zeros(len(masks)),
            "token": zeros(len(masks), len(px)), "phi_token": zeros(len(masks), len(px))}
    with torch.no_grad():
        anchor = (0.5 * ((y - x @ wstar[0].T) ** 2).sum(-1)).mean().double()
    for step in range(BURNIN + draws * EVERY):
        w.requires_grad_(True)
        loss = (0.5 * ((y - torch.einsum("gij,nj->gni", w, x)) ** 2).sum(-1)).mean(1)
        grad, = torch.autograd.grad(loss.sum(), w)
        with torch.no_grad():
            w = w.detach()
            if step >= BURNIN and (step - BURNIN) % EVERY == 0:  # draw before the update
                tokens = (0.5 * (py - torch.einsum("gij,nj->gni", w, px)) ** 2).sum(-1).double()
                observable = loss.double()
                phi = observable - anchor
                for key, value in (("phi", phi), ("loss", observable),
                                   ("phi_loss", phi * observable), ("token", tokens),
                                   ("phi_token", phi[:, None] * tokens)):
                    sums[key] += value
            drift = N_BETA * grad + GAMMA * (w - wstar)
            noise = torch.randn(w.shape, generator=generator, device=device)
            w = w - masks * (EPS / 2 * drift - math.sqrt(EPS) * noise)
    mean = {k: (v.view(len(names), chains, *v.shape[1:]).sum(1) / (chains * draws)).cpu()
            for k, v in sums.items()}
    full_delta = mean["token"][-1] - mean["loss"][-1]  # E_full[l - L]
    # chi = -(E_C[phi (l - L)] - E_C[phi] E_full[l - L]), ESTIMATOR.md
    return {name: (-((mean["phi_token"][row] - mean["phi_loss"][row])
                     - mean["phi"][row] * full_delta)).numpy()
            for row, name in enumerate(names[:-1])}


def engine_inputs(problem: Regression):
    """The model at ``w*``, the sampling data, the probe and the components (the loss is
    :func:`squared_loss`)."""
    from susc_callback import Component, ProbeSet

    model = torch.nn.Linear(D_IN, D_OUT, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(problem.wstar.reshape(D_OUT, D_IN)))
    data = {"x": _tensor(problem.x, "cpu"), "y": _tensor(problem.y, "cpu")}
    probe = ProbeSet.from_batch({"x": _tensor(problem.probe_x, "cpu"),
                                 "y": _tensor(problem.probe_y, "cpu")},
                                datasets=["sampling"] * SAMPLING_PROBES
                                + ["held_out"] * HELD_OUT_PROBES)
    components = [Component(name, {"weight": torch.tensor(mask.reshape(D_OUT, D_IN))},
                            allow_overlap=True) for name, mask in MASKS.items()]
    return model, data, probe, components


def squared_loss(model, batch):
    return 0.5 * ((batch["y"] - model(batch["x"])) ** 2).sum(-1)


def run_engine(problem: Regression, chains: int, draws: int, device: str, seed: int = 0
               ) -> dict[str, np.ndarray]:
    from susc_callback import SGLDConfig, estimate_susceptibilities

    model, data, probe, components = engine_inputs(problem)
    config = SGLDConfig(step_size=EPS, n_beta=N_BETA, gamma=GAMMA, num_chains=chains,
                        num_draws=draws, steps_between_draws=EVERY, num_burnin=BURNIN,
                        batch_size=N, observable="fixed", observable_sequences=N,
                        eval_batch_size=N, seed=seed, progress=False, device=device)
    result = estimate_susceptibilities(model, components, data, probe, config,
                                       loss_fn=squared_loss)
    return {name: result.chi[row] for row, name in enumerate(result.component_names)}


def run_devinterp(problem: Regression, chains: int, draws: int, device: str) -> None:
    """devinterp's ``susceptibilities()`` on the same problem; its numbers are not read
    back (only its time is compared): it stores every draw's per-token losses."""
    import tempfile

    from datasets import Dataset
    from devinterp.slt.susceptibilities import susceptibilities

    model = engine_inputs(problem)[0].to(device)
    rows = lambda x, y: Dataset.from_dict(  # noqa: E731
        {"input_ids": np.concatenate([x, y], 1).astype(np.float32).tolist()}
    ).with_format("torch")

    def loss_fn(model, packed):
        x, y = packed[:, :D_IN].float(), packed[:, D_IN:].float()
        # devinterp wants per-token losses (batch, columns - 1): the sample's loss in each
        return (0.5 * ((y - model(x)) ** 2).sum(-1))[:, None].expand(-1, packed.shape[1] - 1)

    sampling = rows(problem.x, problem.y)
    # devinterp evaluates observables in whole batches of batch_size (= N) rows: the probe
    # points are repeated to fill one (the cost is per batch on this model, not per row)
    tiles = -(-N // len(problem.probe_x))
    probe = rows(np.tile(problem.probe_x, (tiles, 1))[:N], np.tile(problem.probe_y,
                                                                  (tiles, 1))[:N])
    restrictions = {name: {"weight": torch.tensor(mask.reshape(D_OUT, D_IN), device=device)}
                    for name, mask in MASKS.items()}
    restrictions["full"] = None
    with tempfile.TemporaryDirectory() as tmp:
        susceptibilities(model, sampling, observables={"train": (sampling, 1),
                                                       "probe": (probe, 1)},
                         weight_restrictions=restrictions, sampling_task="train", lr=EPS,
                         n_beta=N_BETA, localization=GAMMA, loss_fn=loss_fn,
                         num_chains=chains, num_draws=draws, batch_size=N,
                         num_burnin_steps=BURNIN, num_steps_bw_draws=EVERY, device=device,
                         output_path=f"{tmp}/samples.zarr")


def chain_steps(chains: int, draws: int) -> int:
    """SGLD steps of all chains of the three components and the full chain."""
    return (len(MASKS) + 1) * chains * (BURNIN + draws * EVERY)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _correlations(chi: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.corrcoef(chi[name], exact[name])[0, 1]) for name in exact}


def bench_many_chains(device: str, engine_chains: int, engine_draws: int,
                      devinterp_chains: int, devinterp_draws: int, with_devinterp: bool
                      ) -> list[tuple[str, float]]:
    """Every tool on the workload, side by side; returns ``(metric, value)`` for the
    targets of ``bench.report.TARGETS``."""
    problem = Regression.make()
    exact = problem.exact_chi()
    full_steps = chain_steps(CHAINS, DRAWS)
    print(f"\n== many-chains: Linear(3, 2) on {N} points (full batch), components "
          f"{list(MASKS)} + full, {CHAINS} chains x {DRAWS} draws every {EVERY} steps, "
          f"burn-in {BURNIN} ({full_steps:,} chain-steps); eps {EPS}, n_beta {N_BETA}, "
          f"gamma {GAMMA}")
    floor_time, floor_chi = _timed(run_floor, problem, CHAINS, DRAWS, device)
    floor_corr = _correlations(floor_chi, exact)
    print(f"   floor (vectorised torch): {floor_time:.1f} s; per-probe correlation with the "
          f"closed form: " + ", ".join(f"{k} {v:.3f}" for k, v in floor_corr.items()))
    engine_time, engine_chi = _timed(run_engine, problem, engine_chains, engine_draws, device)
    scale = full_steps / chain_steps(engine_chains, engine_draws)
    engine_full = engine_time * scale
    engine_corr = _correlations(engine_chi, exact)
    scaled = "" if scale == 1 else (f" with {engine_chains} chains x {engine_draws} draws, "
                                    f"x{scale:.1f} scaled linearly to the workload = "
                                    f"{engine_full:.1f} s")
    print(f"   engine: {engine_time:.1f} s{scaled}; {engine_full / floor_time:.1f}x the floor; "
          f"correlation ({engine_chains} chains): "
          + ", ".join(f"{k} {v:.3f}" for k, v in engine_corr.items()))
    checks = [("engine/floor time", engine_full / floor_time),
              ("engine time (s)", engine_full)]
    if scale == 1:  # the target is for the workload's chains and draws
        checks.append(("min correlation", min(engine_corr.values())))
    if with_devinterp:
        devinterp_time, _ = _timed(run_devinterp, problem, devinterp_chains, devinterp_draws,
                                   device)
        devinterp_scale = full_steps / chain_steps(devinterp_chains, devinterp_draws)
        print(f"   devinterp 2.0.1: {devinterp_time:.1f} s with {devinterp_chains} chains x "
              f"{devinterp_draws} draws, x{devinterp_scale:.1f} scaled linearly to the "
              f"workload = {devinterp_time * devinterp_scale:.0f} s "
              f"({devinterp_time * devinterp_scale / engine_full:.1f}x the engine)")
    return checks
