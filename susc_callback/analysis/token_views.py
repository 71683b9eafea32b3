"""What the per-token view of a component shows: chi, its covariance part, or chi relative
to the component's layer.

``chi`` splits into two parts (:mod:`susc_callback.estimator.sums`)::

    chi_C(x) = -Cov_C(phi, l_x - L)  +  E_C[phi] * u_C(x),
    u_C(x)   = -(E_C - E_full)[l_x - L].

On a trained model the second part dominates every per-token profile. Its profile per
unit of ``E_C[phi]``, ``u_C``, is nearly the same for all heads of a layer: it mostly says how
far the full chain moves token ``x``'s loss. So ``chi`` on its own shows each head's scale
(``E_C[phi]``) times one shared profile. The demo's induction probes show this (see
docs/tutorial.md). The view "relative-to-layer" removes the profile that the other
components of the layer share, scaled to the component::

    relative_C(x) = chi_C(x) - E_C[phi] * mean_{C' in layer(C)} u_C'(x),

which leaves what the component does differently from the rest of its layer. The
component's own covariance part is always kept.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from susc_callback.analysis.pca import Standardization, standardize
from susc_callback.components.architectures import group_by_layer
from susc_callback.estimator.results import SusceptibilityResult

TokenQuantity = Literal["relative-to-layer", "chi", "covariance"]
TOKEN_QUANTITIES: tuple[str, ...] = get_args(TokenQuantity)
DEFAULT_QUANTITY: TokenQuantity = "relative-to-layer"
DESCRIPTIONS = {
    "relative-to-layer": "chi minus the baseline profile that the other components of its "
                         "layer share, scaled to this component: what it does differently "
                         "from the rest of its layer",
    "chi": "the susceptibility chi itself, as the PCA sees it (on a trained model mostly one "
           "profile that every component of a layer shares, times the component's E[phi])",
    "covariance": "chi's covariance part -Cov_C(phi, l_x - L) alone, without the baseline "
                  "correction",
}


def token_quantity(result: SusceptibilityResult, quantity: TokenQuantity = DEFAULT_QUANTITY,
                   standardization: Standardization = "structural-inference") -> np.ndarray:
    """``(C, P)``: ``quantity`` for every component and probe token, standardized like the
    PCA's input (``standardization``); NaN rows for failed components."""
    if quantity not in TOKEN_QUANTITIES:
        raise ValueError(f"Invalid token quantity {quantity!r}; valid: "
                         f"{', '.join(TOKEN_QUANTITIES)}")
    if quantity != "chi" and result.chi_covariance is None:
        raise ValueError(f"The token quantity {quantity!r} needs chi's covariance part, which "
                         "results saved before format 2 do not hold; use 'chi' or estimate "
                         "again")
    finite = np.flatnonzero(result.finite_components)
    values = np.full(result.chi.shape, np.nan)
    if not len(finite):
        return values
    chi = result.chi[finite]
    if quantity == "covariance":
        raw = result.chi_covariance[finite]
    elif quantity == "chi":
        raw = chi
    else:
        raw = _relative_to_layer(chi, result.chi_covariance[finite], result.mean_phi[finite],
                                 [result.component_names[c] for c in finite])
    values[finite] = standardize(raw, standardization).T
    return values


def _relative_to_layer(chi: np.ndarray, covariance: np.ndarray, mean_phi: np.ndarray,
                       names: list[str]) -> np.ndarray:
    """``chi - E_C[phi] * mean u`` over each component's layer (the module docstring). A
    component alone in its layer is left with its covariance part."""
    scale = np.where(mean_phi != 0, mean_phi, np.nan)[:, None]
    per_unit_phi = (chi - covariance) / scale
    relative = np.empty_like(chi)
    for rows in group_by_layer(names).values():
        shared = np.nanmean(per_unit_phi[rows], axis=0)
        relative[rows] = chi[rows] - mean_phi[rows, None] * shared
    return np.where(np.isfinite(relative), relative, covariance)
