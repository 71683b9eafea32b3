"""Streaming susceptibility estimates: running sums over draws, no per-draw traces.

For a component C with draws of ``phi = L(w) - L(w*)``, the observable loss ``L`` and probe
token losses ``l_x``, and the full chain's draws (ESTIMATOR.md)::

    chi[C, x] = -( E_C[phi * (l_x - L)] - E_C[phi] * E_full[l_x - L] )
              = -Cov_C(phi, l_x - L)  -  E_C[phi] * (E_C - E_full)[l_x - L]

Negative: the component expresses the pattern in token x; positive: it suppresses it. The
first term of the second line (:func:`covariance_susceptibilities`) is the component's own
response; the second, the baseline correction, is one token profile (how far the
component's chains stay from the full chain's) scaled by ``E_C[phi]``, nearly the same for
every component.

**Standard errors.** The sums are kept per *block*: each chain's draws are cut into
``ERROR_BLOCKS`` contiguous blocks, and the pooled sums are the blocks' totals. Leaving one
block out (of the component's chains and of the full chain alike: chains with the same
index share their minibatches) gives a jackknife replicate of every estimate, and their
spread its standard error (:func:`jackknife_se`). Chains are independent; contiguous
blocks are nearly so when a block is much longer than a chain's autocorrelation time
(batch means). That is the correction for autocorrelation within chains: blocks shorter
than it make the standard errors too small.
"""

from __future__ import annotations

import numpy as np
import torch

from susc_callback.estimator.moments import LossCrossMoments

ERROR_BLOCKS = 4
"""Contiguous blocks of draws per chain, the jackknife's units (fewer with fewer draws)."""


def error_blocks(num_draws: int) -> int:
    """Blocks per chain: ``ERROR_BLOCKS``, or one per draw with fewer draws."""
    return max(1, min(ERROR_BLOCKS, num_draws))


def block_of(draw: int, num_draws: int) -> int:
    """The block of draws that draw ``draw`` of a chain belongs to."""
    return draw * error_blocks(num_draws) // num_draws

_FIELDS = ("count", "phi", "loss", "phi_loss", "phi_loss_diagonal", "token", "phi_token",
           "anchor", "displacement")


class DrawSums:
    """Float64 running sums of one component's draws, per block of draws of each chain.

    Memory is O(probe tokens x chains x blocks), independent of the number of draws. With
    ``moments`` the draws' probe losses also go into those cross-moments (the influence
    matrix's sums).
    """

    def __init__(self, num_tokens: int, num_chains: int, num_draws: int,
                 device: torch.device, moments: LossCrossMoments | None = None,
                 kappa: float = 0.0) -> None:
        self.moments, self.num_draws, self.kappa = moments, num_draws, kappa
        self.blocks = error_blocks(num_draws)
        groups = num_chains * self.blocks
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.count, self.phi, self.loss, self.phi_loss = (zeros(groups) for _ in range(4))
        self.phi_loss_diagonal = zeros(groups)
        self.token, self.phi_token = zeros(groups, num_tokens), zeros(groups, num_tokens)
        self.anchor, self.displacement = zeros(groups), zeros(groups)
        self.loss_trace = torch.full((num_chains, num_draws), float("nan"), dtype=torch.float64,
                                     device=device)
        self.probe_trace = self.loss_trace.clone()

    def add(self, chains: torch.Tensor, draw: int, loss: torch.Tensor,
            anchor_loss: torch.Tensor, token_losses: torch.Tensor,
            displacement: torch.Tensor, diagonal: torch.Tensor | None = None) -> None:
        """Add draw ``draw`` of the (distinct) chains ``chains`` ``(n,)``: observable losses
        ``L`` ``(n,)``, ``L(w*)`` (a scalar or ``(n,)``), probe losses ``l`` ``(n, P)``,
        each chain's mean squared displacement ``|u - u*|^2 / d`` ``(n,)`` and the diagonals
        ``sum_s w_s phi_s l_s`` of ``phi L`` over the observable sequences ``(n,)`` (None:
        no correction, :mod:`~susc_callback.estimator.observable`).
        Two traces are kept: ``L``, and the mean probe loss, one fixed set for every chain
        and draw (the diagnostics' trace: ``L``'s set may change per block)."""
        g = chains * self.blocks + block_of(draw, self.num_draws)
        loss = loss.detach().double()
        anchor_loss = anchor_loss.double().expand_as(loss)
        phi = loss - anchor_loss
        token_losses = token_losses.detach().double()
        self.count[g] += 1
        self.phi[g] += phi
        self.loss[g] += loss
        self.phi_loss[g] += phi * loss
        self.phi_loss_diagonal[g] += phi * loss if diagonal is None else diagonal.double()
        self.token[g] += token_losses
        self.phi_token[g] += phi[:, None] * token_losses
        self.loss_trace[chains, draw] = loss
        self.probe_trace[chains, draw] = token_losses.mean(-1)
        self.anchor[g] += anchor_loss
        self.displacement[g] += displacement
        if self.moments is not None:
            for row in token_losses:
                self.moments.add(row)

    def merge(self, other: DrawSums, chains: list[int]) -> None:
        """Add the draws of ``other``, which holds those of chains ``chains``."""
        for name in _FIELDS:
            getattr(self, name).add_(getattr(other, name))
        self.loss_trace[chains] = other.loss_trace[chains]
        self.probe_trace[chains] = other.probe_trace[chains]
        if self.moments is not None:
            self.moments.merge(other.moments)

    def chain_arrays(self, chain: int) -> dict[str, np.ndarray]:
        """Chain ``chain``'s sums and traces, as arrays (one chain's shard of an estimate:
        :meth:`add_chain_arrays` puts it back, bit for bit)."""
        if self.moments is not None:
            raise ValueError("The sums of an influence estimate (cross-moments over probe "
                             "tokens) are not split by chain")
        rows = slice(chain * self.blocks, (chain + 1) * self.blocks)
        arrays = {name: getattr(self, name)[rows] for name in _FIELDS}
        arrays.update(loss_trace=self.loss_trace[chain], probe_trace=self.probe_trace[chain])
        return {name: value.cpu().numpy() for name, value in arrays.items()}

    def add_chain_arrays(self, chain: int, arrays: dict[str, np.ndarray]) -> None:
        """Add chain ``chain``'s draws from :meth:`chain_arrays` (run elsewhere)."""
        rows = slice(chain * self.blocks, (chain + 1) * self.blocks)
        device = self.count.device
        for name in _FIELDS:
            getattr(self, name)[rows] += torch.from_numpy(arrays[name]).to(device)
        self.loss_trace[chain] = torch.from_numpy(arrays["loss_trace"]).to(device)
        self.probe_trace[chain] = torch.from_numpy(arrays["probe_trace"]).to(device)

    @property
    def total(self) -> int:
        return int(self.count.sum())

    def pooled(self) -> dict[str, torch.Tensor]:
        """The sums over all draws (every block of every chain)."""
        return {name: getattr(self, name).sum(0) for name in _FIELDS}

    def mean_phi(self) -> float:
        n = self.total
        return float(self.phi.sum() / n) if n else float("nan")

    def localisation_share(self, gamma: float, step_size: float) -> float:
        """``gamma (1 - eps gamma / 4) E|u - u*|^2 / d``: how much of the posterior's spread
        the localisation sets. The SGLD chain on the localisation alone has per-entry
        variance ``1 / (gamma (1 - eps gamma / 4))`` (the discrete chain's, exactly), so the
        share is 1 when the loss is flat in the component; for a Gaussian posterior with
        precision ``n_beta H + gamma I`` it is about the mean over directions of ``gamma /
        (n_beta h_i + gamma)``, near 0 when the loss confines the component."""
        n = self.total
        scale = gamma * (1 - step_size * gamma / 4)
        return float(scale * self.displacement.sum() / n) if n else float("nan")

    def mean_anchor(self) -> float:
        """Mean over draws of L(w*) (it varies per draw with a minibatch observable)."""
        n = self.total
        return float(self.anchor.sum() / n) if n else float("nan")


def _chi(c: dict[str, torch.Tensor], f: dict[str, torch.Tensor], kappa: float
         ) -> torch.Tensor:
    """chi from pooled sums (a block axis in front broadcasts), with the finite-set
    correction ``kappa``."""
    n, n_full = c["count"][..., None], f["count"][..., None]
    cov_term = (c["phi_token"] - c["phi_loss"][..., None]) / n
    baseline = (c["phi"][..., None] / n) * (f["token"] - f["loss"][..., None]) / n_full
    return -(cov_term - baseline) + _finite_set_correction(c, kappa)


def _finite_set_correction(c: dict[str, torch.Tensor], kappa: float) -> torch.Tensor:
    """``kappa (E[phi L] - E[sum_s w_s phi_s l_s])``, the same for every probe token."""
    return kappa * ((c["phi_loss"] - c["phi_loss_diagonal"]) / c["count"])[..., None]


def susceptibilities(component: DrawSums, full: DrawSums) -> np.ndarray:
    """Per-token susceptibility row ``chi[C, :]`` (P,) from the two chains' sums."""
    return _chi(component.pooled(), full.pooled(), component.kappa).cpu().numpy()


def susceptibility_replicates(component: DrawSums, full: DrawSums
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Jackknife replicates ``(blocks, P)`` of ``chi[C, :]`` and ``(blocks,)`` of
    ``E_C[phi]``, each without one block (of the component and of the full chain, paired
    by chain and block; blocks without draws in either are skipped)."""
    both = (component.count > 0) & (full.count > 0)
    c, f = _leave_one_out(component, both), _leave_one_out(full, both)
    return _chi(c, f, component.kappa).cpu().numpy(), (c["phi"] / c["count"]).cpu().numpy()


def half_susceptibilities(component: DrawSums, full: DrawSums) -> np.ndarray:
    """``(2, P)``: ``chi[C, :]`` from each half of the draws, for split-half reliability.
    The halves are the first and the last half of the chains (of the blocks, with one
    chain), paired between the component and the full chain."""
    chains = len(component.count) // component.blocks
    units = chains if chains >= 2 else component.blocks
    unit = torch.arange(len(component.count), device=component.count.device)
    unit = unit // component.blocks if chains >= 2 else unit
    halves = []
    for first in (True, False):
        mask = (unit < units // 2) if first else (unit >= units // 2)
        c, f = ({k: getattr(sums, k)[mask].sum(0) for k in _FIELDS}
                for sums in (component, full))
        halves.append(_chi(c, f, component.kappa))
    return torch.stack(halves).cpu().numpy()


def mean_phi_replicates(sums: DrawSums) -> np.ndarray:
    """Jackknife replicates ``(blocks,)`` of ``E[phi]`` of one chain's sums (the full
    chain's, for the LLC), each without one block that has draws."""
    c = _leave_one_out(sums, sums.count > 0, ("phi", "count"))
    return (c["phi"] / c["count"]).cpu().numpy()


def _leave_one_out(sums: DrawSums, blocks: torch.Tensor, fields: tuple[str, ...] = _FIELDS
                   ) -> dict[str, torch.Tensor]:
    """Per block in ``blocks`` (a mask), the sums of every other block."""
    return {k: getattr(sums, k).sum(0) - getattr(sums, k)[blocks] for k in fields}


def jackknife_se(replicates: np.ndarray) -> np.ndarray:
    """The jackknife standard error from leave-one-out replicates ``(G, ...)``:
    ``sqrt((G - 1) / G * sum_g (theta_g - mean)^2)``; NaN with fewer than 2."""
    count = len(replicates)
    if count < 2:
        return np.full(replicates.shape[1:], np.nan)
    spread = ((replicates - replicates.mean(0)) ** 2).sum(0)
    return np.sqrt((count - 1) / count * spread)


def covariance_susceptibilities(component: DrawSums) -> np.ndarray:
    """``-Cov_C(phi, l_x - L)`` (P,): ``chi[C, :]`` without the baseline correction."""
    c = component.pooled()
    n = c["count"]
    mean_phi = c["phi"] / n
    covariance = (c["phi_token"] - c["phi_loss"]) / n - mean_phi * (c["token"] - c["loss"]) / n
    return (-covariance + _finite_set_correction(c, component.kappa)[0]).cpu().numpy()
