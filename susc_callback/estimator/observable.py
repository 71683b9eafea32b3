"""What a draw's observable loss ``L`` (in ``phi = L(w) - L(w*)``) is measured on, and
its anchor ``L(w*)``, following ``SGLDConfig.observable``:

* ``"fixed"``: one set of ``observable_sequences`` sampling sequences for every draw of
  every chain (captured once per prefix group by the plan);
* ``"per-block"``: each block of draws of each chain (:func:`~.sums.block_of`) its own
  random set, seeded by ``(seed, chain, block)`` and anchored exactly on itself, so that
  the blocks the standard errors leave out also differ in which sequences define ``L``;
* ``"minibatch"``: the draw's own SGLD minibatch, anchored on that minibatch.

**A finite set biases chi.** ``chi`` holds ``E_C[phi L]``, where ``phi`` and ``L`` are
means over the same ``m`` sequences: its pairs of one sequence with itself add about
``1/m`` of a sequence's own loss covariance, the same for every probe token (a uniform
shift, which moves the dataset-level numbers by about their own size at ``m = 16``).
With ``unbiased_observable`` the term is replaced by its estimate over pairs of
*distinct* sequences, with the finite-population correction for ``N`` sampling sequences
(nothing changes when ``m = N``)::

    E[phi L] + kappa (E[phi L] - E[sum_s w_s phi_s l_s]),  kappa = (N - m) / (N (m - 1))

``w_s`` being each sequence's share of the set's tokens; the draws' diagonals
``sum_s w_s phi_s l_s`` are :meth:`ChainObservable.diagonal`.
"""

from __future__ import annotations

import torch

from susc_callback.config import SGLDConfig
from susc_callback.data.sampling import SamplingData
from susc_callback.estimator.checks import check_finite_at_optimum
from susc_callback.estimator.sums import block_of
from susc_callback.sampler.group import Captured, GroupLosses
from susc_callback.sampler.sgld import chain_seed, make_generator


def seeded_chunks(data: SamplingData, config: SGLDConfig, device: torch.device,
                  labels: tuple[object, ...], count: int, skip: int = 0) -> list[dict]:
    """Sequences ``skip .. skip + count`` of a permutation of ``data`` seeded by
    ``(seed, *labels)``, in passes of ``eval_batch_size``."""
    order = torch.randperm(len(data), generator=make_generator(
        torch.device("cpu"), chain_seed(config.seed, *labels)))
    indices, size = order[skip:skip + count], config.eval_batch_size
    return [data.batch(indices[i:i + size], device) for i in range(0, len(indices), size)]


def finite_set_kappa(config: SGLDConfig, population: int) -> float:
    """``kappa`` of the finite-set correction (module docstring): 0 when it is off, for a
    minibatch observable, or with a single observable sequence (no pairs)."""
    m = config.observable_sequences
    if not config.unbiased_observable or config.observable == "minibatch" or m < 2:
        return 0.0
    return (population - m) / (population * (m - 1))


class ChainObservable:
    """The observable of one chain of one prefix group as its steps go by: ``chunks``,
    the captured set a draw's ``L`` is the mean over (None: the minibatch), ``anchor``,
    its ``L(w*)``, and per sequence its share of the set's tokens, its anchor and
    ``l_s(w*)``."""

    def __init__(self, config: SGLDConfig, data: SamplingData, losses: GroupLosses,
                 chain_index: int, anchor: torch.Tensor | None, device: torch.device) -> None:
        self.config, self.data, self.losses = config, data, losses
        self.chain_index, self.device = chain_index, device
        self.chunks: Captured | None = None
        self.anchor, self._block = anchor, None
        self.weights = self.sequence_anchors = self.sequence_optimum = None
        if config.observable == "fixed":
            self._use(losses.observable)

    def _use(self, chunks: Captured) -> torch.Tensor:
        """Measure ``L`` on ``chunks`` from now on; returns their ``L(w*)`` (evaluations
        without a chain loaded are at ``w*``)."""
        self.chunks = chunks
        totals, counts = self.losses.sequence_totals(chunks)
        self.weights = counts[0] / counts[0].sum()
        self.sequence_optimum = self.sequence_anchors = totals[0] / counts[0].clamp(min=1)
        if self.config.anchor == "separate-batches":  # phi_s = l_s - the other set's L
            self.sequence_anchors = torch.full_like(self.weights, float(self.anchor))
        return totals[0].sum() / counts[0].sum()

    def diagonal(self, sequence_losses: torch.Tensor | None) -> torch.Tensor | None:
        """``sum_s w_s phi_s l_s`` of a draw's per-sequence losses ``(n, S)`` of ``n``
        chains, ``(n,)`` (None: no set)."""
        if sequence_losses is None or self.weights is None:
            return None
        return (self.weights * (sequence_losses - self.sequence_anchors)
                * sequence_losses).sum(-1)

    def at(self, draw: int | None, batch: dict, hidden: torch.Tensor | None) -> None:
        """Move to SGLD step whose draw is ``draw`` (None: no draw) and minibatch ``batch``
        (captured ``hidden``). Evaluations without a chain loaded are at ``w*``."""
        cfg = self.config
        if draw is None:
            return
        if cfg.observable == "minibatch" and cfg.anchor == "exact":
            self.anchor = self.losses.mean([(batch, hidden)])[0]
        elif cfg.observable == "per-block" and self._block != block_of(draw, cfg.num_draws):
            self._block = block_of(draw, cfg.num_draws)
            self.anchor = self._use(self.losses.captured(seeded_chunks(
                self.data, cfg, self.device, ("observable", self.chain_index, self._block),
                cfg.observable_sequences)))
            check_finite_at_optimum(self.anchor, f"observable loss (chain {self.chain_index}, "
                                                 f"block {self._block})")
