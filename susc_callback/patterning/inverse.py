"""Patterning: the data weights that move the components' structural coordinates by a
chosen amount, from the ridge-regularised inverse of the susceptibilities.

Coordinates and the linear map
------------------------------
Component C's coordinate is ``mu_C = E_C[phi]`` (its mean excess loss, ``rLLC_C / n_beta``).
Train on the pool of probe tokens with normalised loss weights ``w``, i.e. the loss
``sum_x w_x l_x / sum_x w_x``. To first order in ``w - 1`` it is
``L + sum_x h_x (l_x - L)`` with ``h_x = (w_x - mean w) / (N mean w)`` over the N pool
tokens. The posterior then moves ``mu`` by

    delta mu = n_beta * X h,      X = -Cov_C(phi, l_x - L)  (``result.chi_covariance``).

Because ``h`` sums to 0, only X's deviation from each component's mean over the pool acts
(a uniform reweighting does nothing), so X is centred per component. This is the
fluctuation-dissipation identity; ``tests/test_patterning.py`` checks it against a closed
form on a Gaussian posterior. It uses chi's covariance part. The full ``chi`` adds the
renormalisation term ``E_C[phi] d log(Z_C / Z)`` (primer eq. 34), which predicts the
*renormalised* coordinate; ``susceptibility="chi"`` uses it as the papers do. The sign
follows from X: when ``X[C, x] < 0`` (C expresses x), up-weighting x lowers ``mu_C``.

The inverse
-----------
Weights are chosen per group of tokens G: a token, a probe sequence or a probe dataset.
``A`` is the tokens x groups indicator and ``J = (n_beta / N) X_c A`` (X centred). The
direction ``v`` solves the ridge problem on the *token* weights,

    v = argmin |J v - target|^2 + lam |A v|^2,

so the three granularities are one problem restricted to weights constant on a group.
With ``n = A'A`` (tokens per group) and ``J n^-1/2 = U S V'``, the solution is
``v = n^-1/2 V diag(s / (s^2 + lam)) U' target``. For tokens that is the primer's
``V diag(s/(s^2+lam)) U' target`` (ESTIMATOR.md, "Patterning"). The ridge damps modes with
``s`` below ``sqrt(lam)``, whose ``1/s`` would amplify the estimate's noise; the default
``lam = 0.01 s_1^2`` damps modes below a tenth of the largest. ``rank`` keeps only the
leading modes.

Loss weights are ``1 + alpha v``. The default ``alpha`` makes the largest change 0.5.
Weights below ``min_weight`` are clipped and counted. The first-order prediction of the
clipped weights, ``predicted``, is returned next to the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from susc_callback.analysis.pca import SusceptibilityPCA
from susc_callback.estimator.results import SusceptibilityResult

Granularity = Literal["token", "sequence", "dataset"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
Susceptibility = Literal["covariance", "chi"]
Target = dict[str, float] | np.ndarray | str | tuple[str, float]
"""A change of coordinates: ``{component: change}`` (others 0), a vector over the result's
components, or a principal component of the standardized matrix, ``"PC2"`` or
``("PC2", size)`` (its loading vector times ``size``, default 1)."""


@dataclass
class PatterningPlan:
    """Data weights for a target change of the components' coordinates.

    Attributes:
        component_names: the C components (finite ones) the coordinates belong to.
        target: ``(C,)`` the requested change of ``mu = E_C[phi]``.
        predicted: ``(C,)`` the first-order change the (clipped) weights produce.
        granularity: "token", "sequence" or "dataset".
        groups: the G group labels: token indices, sequence indices or dataset names.
        direction: ``(G,)`` the ridge solution ``v``.
        alpha: the step size of ``weights = 1 + alpha * direction``.
        weights: ``(G,)`` the loss weights, clipped at ``min_weight``.
        token_weights: ``(P,)`` ``weights`` on every probe token.
        clipped: how many groups had a weight below ``min_weight`` before clipping.
        singular_values: ``(r,)`` of ``J n^-1/2``; ``ridge``: the ``lam`` used.
    """

    component_names: list[str]
    target: np.ndarray
    predicted: np.ndarray
    granularity: str
    groups: list
    direction: np.ndarray
    alpha: float
    weights: np.ndarray
    token_weights: np.ndarray
    clipped: int
    singular_values: np.ndarray
    ridge: float


def plan_patterning(result: SusceptibilityResult, target: object, *,
                    granularity: Granularity = "token", ridge: float = 1e-2,
                    rank: int | None = None, alpha: float | None = None,
                    max_change: float = 0.5, min_weight: float = 0.0,
                    susceptibility: Susceptibility = "covariance") -> PatterningPlan:
    """Data weights that move the coordinates of ``result``'s components by ``target``.

    Args:
        result: a susceptibility estimate on the pool to be reweighted (its probe set).
        target: see :data:`Target`.
        granularity: one weight per probe token, sequence or dataset.
        ridge: ``lam`` relative to the largest squared singular value (> 0).
        rank: keep only this many leading modes (None: all).
        alpha: step size; None scales the direction so that its largest change is
            ``max_change``.
        min_weight: weights below it are clipped (and counted in ``clipped``).
        susceptibility: "covariance" (the first-order derivative of ``E_C[phi]``) or "chi".
    """
    _check_options(granularity, ridge, rank, max_change, susceptibility)
    finite = result.finite_components
    names = [n for n, keep in zip(result.component_names, finite) if keep]
    matrix = result.chi if susceptibility == "chi" else result.chi_covariance
    if matrix is None:
        raise ValueError("This result holds no chi_covariance (saved before format 2): "
                         "estimate again, or pass susceptibility='chi'")
    goal = _target_vector(result, target, names)
    groups, index = _groups(result, granularity)
    counts = np.bincount(index, minlength=len(groups)).astype(np.float64)
    centred = matrix[finite] - matrix[finite].mean(axis=1, keepdims=True)
    group_sums = np.stack([np.bincount(index, weights=row, minlength=len(groups))
                           for row in centred])  # X_c A, without the tokens x groups matrix
    jacobian = result.config["n_beta"] / len(index) * group_sums
    u, s, vt = np.linalg.svd(jacobian / np.sqrt(counts), full_matrices=False)
    keep = len(s) if rank is None else min(rank, len(s))
    lam = ridge * float(s[0]) ** 2 if len(s) and s[0] > 0 else ridge
    gains = s[:keep] / (s[:keep] ** 2 + lam)
    direction = (vt[:keep].T @ (gains * (u[:, :keep].T @ goal))) / np.sqrt(counts)
    largest = float(np.abs(direction).max())
    if alpha is None:
        alpha = max_change / largest if largest > 0 else 0.0
    raw = 1.0 + alpha * direction
    weights = np.maximum(raw, min_weight)
    token_weights = weights[index]
    predicted = _first_order_change(jacobian, weights, counts)
    return PatterningPlan(names, goal, predicted, granularity, groups, direction, float(alpha),
                          weights, token_weights, int((raw < min_weight).sum()), s[:keep], lam)


def _first_order_change(jacobian: np.ndarray, weights: np.ndarray, counts: np.ndarray
                        ) -> np.ndarray:
    """The first-order change of the coordinates under group weights ``weights``:
    ``J (w - 1) / mean w`` (the mean over the pool's tokens; the loss is normalised)."""
    mean = float((weights * counts).sum() / counts.sum())
    return jacobian @ (weights - 1.0) / mean


def _target_vector(result: SusceptibilityResult, target: object, names: list[str]
                   ) -> np.ndarray:
    if isinstance(target, str) or (isinstance(target, tuple) and len(target) == 2
                                   and isinstance(target[0], str)):
        label, size = (target, 1.0) if isinstance(target, str) else target
        return _pc_target(result, label, float(size), names)
    if isinstance(target, dict):
        unknown = [n for n in target if n not in result.component_names]
        if unknown:
            raise ValueError(f"Target names {unknown}, not components of this result; "
                             f"valid: {names}")
        failed = [n for n in target if n not in names]
        if failed:
            raise ValueError(f"Target names failed components {failed} (their chains "
                             f"diverged: NaN rows); valid: {names}")
        goal = np.zeros(len(names))
        for name, change in target.items():
            goal[names.index(name)] = float(change)
        return goal
    goal = np.asarray(target, dtype=np.float64)
    if goal.shape != (len(names),) or not np.isfinite(goal).all():
        raise ValueError(f"A target vector needs one finite value per finite component "
                         f"({len(names)}: {names}), got shape {goal.shape}")
    return goal


def _pc_target(result: SusceptibilityResult, label: str, size: float, names: list[str]
               ) -> np.ndarray:
    if not (label.upper().startswith("PC") and label[2:].isdigit() and int(label[2:]) >= 1):
        raise ValueError(f"Invalid target {label!r}: a principal component is 'PC1', 'PC2', "
                         "..., or give {component: change} or a vector")
    k = int(label[2:])
    pca = SusceptibilityPCA(k).fit(result)
    if len(pca.loadings_) < k:
        raise ValueError(f"Target {label!r}: the result has only {len(pca.loadings_)} PCs")
    loadings = dict(zip(pca.component_names_, pca.loadings_[k - 1]))
    return size * np.array([loadings[n] for n in names])


def _groups(result: SusceptibilityResult, granularity: str) -> tuple[list, np.ndarray]:
    """Group labels and each probe token's group index."""
    if granularity == "token":
        return list(range(len(result.token_sequence))), np.arange(len(result.token_sequence))
    if granularity == "sequence":
        sequences, index = np.unique(result.token_sequence, return_inverse=True)
        return [int(s) for s in sequences], index
    datasets, index = np.unique(result.token_dataset, return_inverse=True)
    return [result.dataset_names[d] for d in datasets], index


def _check_options(granularity: str, ridge: float, rank: int | None, max_change: float,
                   susceptibility: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"Invalid granularity {granularity!r}; valid: "
                         f"{', '.join(GRANULARITIES)}")
    if not (isinstance(ridge, (int, float)) and np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"Invalid ridge {ridge!r}: must be a finite number > 0 (relative to "
                         "the largest squared singular value)")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"Invalid rank {rank!r}: an integer >= 1, or None for all modes")
    if not (np.isfinite(max_change) and max_change > 0):
        raise ValueError(f"Invalid max_change {max_change!r}: must be > 0")
    if susceptibility not in get_args(Susceptibility):
        raise ValueError(f"Invalid susceptibility {susceptibility!r}; valid: 'covariance', "
                         "'chi'")
