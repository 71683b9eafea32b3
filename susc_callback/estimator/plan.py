"""What an estimate will do, fixed before the first SGLD step (:mod:`.planner` makes it).

Nothing in a plan changes while the chains run: the runner keeps its own state (which
chains failed, whether a group fell back to one chain at a time, the stack limit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from susc_callback.components.component import ResolvedComponent
from susc_callback.data.sampling import LossFn
from susc_callback.sampler.group import GroupLosses

FULL = "full"
"""Name of the baseline chain over every parameter of the model."""


@dataclass(frozen=True)
class GroupPlan:
    """A prefix group: components that leave the same ``depth`` leading blocks frozen,
    their losses with that prefix replayed, the members whose chains are stacked, and
    how many chain indices advance together (``chain_batch``; all members stacked when
    more than 1)."""

    depth: int
    members: tuple[ResolvedComponent, ...]
    losses: GroupLosses
    stacked: frozenset[str]
    chain_batch: int = 1


@dataclass(frozen=True)
class OptimumDraw:
    """The first draw, when it is taken before any update: every chain is still at ``w*``,
    so it is evaluated once and shared. ``observable`` is None when each chain's
    minibatch loss is its observable."""

    observable: torch.Tensor | None
    tokens: torch.Tensor


@dataclass(frozen=True)
class EstimatePlan:
    """Everything the chains of one estimate share.

    Attributes:
        model: the private float32 snapshot sampled on.
        loss_fn: the per-sample loss (None: next-token cross-entropy).
        components: the requested components, then the full chain (:data:`FULL`).
        groups: prefix groups in order of depth.
        token_sequence, token_position: ``(P,)`` where each valid probe token sits.
        anchor: ``L(w*)`` of the observable; None when each draw's minibatch is measured
            at ``w*`` itself.
        optimum_draw: the shared first draw at ``w*``, or None.
        stack_limit: most chains per stacked batch after the stacking checks.
    """

    model: nn.Module
    loss_fn: LossFn | None
    components: tuple[ResolvedComponent, ...]
    groups: tuple[GroupPlan, ...]
    token_sequence: np.ndarray
    token_position: np.ndarray
    anchor: torch.Tensor | None
    optimum_draw: OptimumDraw | None
    stack_limit: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_sequence)
