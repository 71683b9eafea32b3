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
"""

from __future__ import annotations

import numpy as np
import torch

from susc_callback.estimator.moments import LossCrossMoments


class DrawSums:
    """Float64 running sums of one component's draws (all its chains pooled).

    Memory is O(probe tokens), independent of the number of draws. With ``moments`` the
    draws' probe losses also go into those cross-moments (the influence matrix's sums).
    """

    def __init__(self, num_tokens: int, num_chains: int, num_draws: int,
                 device: torch.device, moments: LossCrossMoments | None = None) -> None:
        self.moments = moments
        zeros = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.phi = zeros.clone()
        self.loss = zeros.clone()
        self.phi_loss = zeros.clone()
        self.token = torch.zeros(num_tokens, dtype=torch.float64, device=device)
        self.phi_token = torch.zeros(num_tokens, dtype=torch.float64, device=device)
        self.anchor = zeros.clone()
        self.loss_trace = torch.full((num_chains, num_draws), float("nan"), dtype=torch.float64,
                                     device=device)

    def add(self, chain: int, draw: int, loss: torch.Tensor, anchor_loss: torch.Tensor,
            token_losses: torch.Tensor) -> None:
        """Add one draw: observable loss ``L``, ``L(w*)`` and probe losses ``l`` (P,)."""
        loss = loss.detach().double()
        phi = loss - anchor_loss.double()
        token_losses = token_losses.detach().double()
        self.count += 1
        self.phi += phi
        self.loss += loss
        self.phi_loss += phi * loss
        self.token += token_losses
        self.phi_token += phi * token_losses
        self.loss_trace[chain, draw] = loss
        self.anchor += anchor_loss.double()
        if self.moments is not None:
            self.moments.add(token_losses)

    def merge(self, other: DrawSums, chains: list[int]) -> None:
        """Add the draws of ``other``, which holds those of chains ``chains``."""
        self.count += other.count
        for name in ("phi", "loss", "phi_loss", "token", "phi_token", "anchor"):
            getattr(self, name).add_(getattr(other, name))
        self.loss_trace[chains] = other.loss_trace[chains]
        if self.moments is not None:
            self.moments.merge(other.moments)

    def mean_phi(self) -> float:
        return float(self.phi / self.count) if self.count else float("nan")

    def mean_anchor(self) -> float:
        """Mean over draws of L(w*) (it varies per draw with a minibatch observable)."""
        return float(self.anchor / self.count) if self.count else float("nan")


def susceptibilities(component: DrawSums, full: DrawSums) -> np.ndarray:
    """Per-token susceptibility row ``chi[C, :]`` (P,) from the two chains' sums."""
    n, n_full = component.count, full.count
    cov_term = (component.phi_token - component.phi_loss) / n
    baseline = (component.phi / n) * (full.token - full.loss) / n_full
    return (-(cov_term - baseline)).cpu().numpy()


def covariance_susceptibilities(component: DrawSums) -> np.ndarray:
    """``-Cov_C(phi, l_x - L)`` (P,): ``chi[C, :]`` without the baseline correction."""
    n = component.count
    mean_phi = component.phi / n
    covariance = (component.phi_token - component.phi_loss) / n \
        - mean_phi * (component.token - component.loss) / n
    return (-covariance).cpu().numpy()
