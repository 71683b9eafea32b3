"""What a draw's observable loss ``L`` (in ``phi = L(w) - L(w*)``) is measured on, and
its anchor ``L(w*)``, following ``SGLDConfig.observable``:

* ``"fixed"``: one set of ``observable_sequences`` sampling sequences for every draw of
  every chain (captured once per prefix group by the plan);
* ``"per-block"``: each block of draws of each chain (:func:`~.sums.block_of`) its own
  random set, seeded by ``(seed, chain, block)`` and anchored exactly on itself, so that
  the blocks the standard errors leave out also differ in which sequences define ``L``;
* ``"minibatch"``: the draw's own SGLD minibatch, anchored on that minibatch.
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


class ChainObservable:
    """The observable of one chain of one prefix group as its steps go by: ``chunks``,
    the captured set a draw's ``L`` is the mean over (None: the minibatch), and
    ``anchor``, its ``L(w*)``."""

    def __init__(self, config: SGLDConfig, data: SamplingData, losses: GroupLosses,
                 chain_index: int, anchor: torch.Tensor | None, device: torch.device) -> None:
        self.config, self.data, self.losses = config, data, losses
        self.chain_index, self.device = chain_index, device
        self.chunks: Captured | None = losses.observable if config.observable == "fixed" \
            else None
        self.anchor, self._block = anchor, None

    def at(self, draw: int | None, batch: dict, hidden: torch.Tensor | None) -> None:
        """Move to SGLD step whose draw is ``draw`` (None: no draw) and minibatch ``batch``
        (captured ``hidden``). Evaluations without a chain loaded are at ``w*``."""
        cfg = self.config
        if draw is None:
            return
        if cfg.observable == "minibatch" and cfg.anchor == "exact":
            self.anchor = self.losses.mean([(batch, hidden)])[0]
        elif cfg.observable == "per-block" and block_of(draw, cfg.num_draws) != self._block:
            self._block = block_of(draw, cfg.num_draws)
            self.chunks = self.losses.captured(seeded_chunks(
                self.data, cfg, self.device, ("observable", self.chain_index, self._block),
                cfg.observable_sequences))
            self.anchor = self.losses.mean(self.chunks)[0]
            check_finite_at_optimum(self.anchor, f"observable loss (chain {self.chain_index}, "
                                                 f"block {self._block})")
