"""Streaming cross-moments of probe-token losses: the sums behind the influence matrix.

The influence matrix (primer Definition 13) is ``-Cov(l_i, l_x)`` between the losses of
two sets of probe rows under a posterior. At every draw the engine already evaluates the
loss of every probe token; :class:`LossCrossMoments` aggregates them into the two sides'
rows (a token, or the mean over a sequence's tokens) and adds float64 sums of ``a``,
``b``, ``a^2``, ``b^2`` and ``a b'``. Memory is O(rows_a x rows_b), independent of the
number of draws; chains are pooled (every draw of every chain is one sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenRows:
    """Which probe tokens make up each row of one side: token ``tokens[k]`` (an index into
    the engine's probe-token order) belongs to row ``rows[k]``; a row's loss is the mean
    of its tokens' losses."""

    tokens: np.ndarray
    rows: np.ndarray
    count: int

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.rows):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.rows)} row labels")
        present = np.zeros(self.count, bool)
        present[self.rows] = True
        if not present.all():
            raise ValueError(f"rows {np.flatnonzero(~present).tolist()} have no valid token")


class LossCrossMoments:
    """Float64 running sums of two sides' row losses at every draw (see module docstring)."""

    def __init__(self, left: TokenRows, right: TokenRows, device: torch.device) -> None:
        self.device = device
        self._sides = [self._side(side) for side in (left, right)]
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.count = 0
        self.left, self.right = zeros(left.count), zeros(right.count)
        self.left_squares, self.right_squares = zeros(left.count), zeros(right.count)
        self.cross = zeros(left.count, right.count)

    def _side(self, side: TokenRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = torch.as_tensor(side.tokens, dtype=torch.long, device=self.device)
        rows = torch.as_tensor(side.rows, dtype=torch.long, device=self.device)
        sizes = torch.zeros(side.count, dtype=torch.float64, device=self.device)
        sizes.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
        return tokens, rows, sizes

    def _rows(self, side: int, token_losses: torch.Tensor) -> torch.Tensor:
        tokens, rows, sizes = self._sides[side]
        totals = torch.zeros_like(sizes).index_add_(0, rows, token_losses[tokens])
        return totals / sizes

    def add(self, token_losses: torch.Tensor) -> None:
        """Add one draw's probe-token losses ``(P,)``."""
        losses = token_losses.detach().double()
        a, b = self._rows(0, losses), self._rows(1, losses)
        self.count += 1
        self.left += a
        self.right += b
        self.left_squares += a * a
        self.right_squares += b * b
        self.cross.addr_(a, b)

    def merge(self, other: LossCrossMoments) -> None:
        self.count += other.count
        for name in ("left", "right", "left_squares", "right_squares", "cross"):
            getattr(self, name).add_(getattr(other, name))

    def covariance(self) -> np.ndarray:
        """``(rows_a, rows_b)`` pooled covariance ``Cov(a, b)`` over all draws."""
        n = self.count
        return (self.cross / n - torch.outer(self.left / n, self.right / n)).cpu().numpy()

    def variances(self) -> tuple[np.ndarray, np.ndarray]:
        """Each side's row variances over all draws."""
        n = self.count
        return tuple((squares / n - (total / n) ** 2).clamp_min(0).cpu().numpy()
                     for squares, total in ((self.left_squares, self.left),
                                            (self.right_squares, self.right)))

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """Each side's mean row losses over all draws."""
        return (self.left / self.count).cpu().numpy(), (self.right / self.count).cpu().numpy()

    @staticmethod
    def nbytes(left_rows: int, right_rows: int) -> int:
        """Bytes of the sums for sides of these sizes."""
        return 8 * (left_rows * right_rows + 2 * (left_rows + right_rows))
