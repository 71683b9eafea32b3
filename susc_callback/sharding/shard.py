"""One chain's share of an estimate, and the estimate merged back from its chains.

An estimate is a sum over chains: every component's running sums keep one row per block
of draws of each chain (:class:`~susc_callback.estimator.sums.DrawSums`), and chains are
seeded by index. So the chains of one estimate can run anywhere, in any grouping; a
:class:`ChainShard` carries one chain's rows of every component's sums, and
:func:`merge_shards` adds them into the sums a single process would have filled, row for
row. Merged from the same chains, the result is the one-process result up to the float
rounding of the stacked evaluation the chains were run with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from susc_callback.config import SGLDConfig
from susc_callback.estimator.engine import Draws
from susc_callback.estimator.plan import FULL
from susc_callback.estimator.sums import DrawSums


@dataclass
class ChainShard:
    """Chain ``chain`` of one estimate: each component's (and ``FULL``'s) sums rows
    (:meth:`DrawSums.chain_arrays`), the components that failed in it, and what every
    shard of the estimate shares (the probe layout, the fixed ``L(w*)``, the chosen draw
    spacing, the finite-set constant ``kappa``)."""

    chain: int
    names: list[str]
    sums: dict[str, dict[str, np.ndarray]]
    failed: dict[str, str]
    token_sequence: np.ndarray
    token_position: np.ndarray
    anchor: np.ndarray | None
    kappa: float
    spacing: dict | None = field(default=None)


def split_draws(draws: Draws, chains: list[int]) -> list[ChainShard]:
    """The shards of ``chains`` (chains that ``draws`` ran)."""
    anchor = None if draws.anchor is None else draws.anchor.detach().cpu().double().numpy()
    spacing = None if draws.spacing is None else draws.spacing.to_dict()
    kappa = draws.sums[FULL].kappa
    return [ChainShard(chain, list(draws.names),
                       {name: sums.chain_arrays(chain) for name, sums in draws.sums.items()},
                       dict(draws.failed), draws.token_sequence, draws.token_position,
                       anchor, kappa, spacing)
            for chain in chains]


def merge_shards(shards: list[ChainShard], config: SGLDConfig, device: torch.device
                 ) -> tuple[Draws, dict | None]:
    """The draws of every chain of ``config.num_chains`` from one shard per chain, and the
    draw spacing they were run with (None unless ``steps_between_draws="auto"``)."""
    by_chain = {shard.chain: shard for shard in shards}
    missing = sorted(set(range(config.num_chains)) - set(by_chain))
    if missing or len(by_chain) != len(shards):
        raise ValueError(f"An estimate needs one shard of each of its {config.num_chains} "
                         f"chains; got chains {sorted(s.chain for s in shards)}")
    first = shards[0]
    for shard in shards[1:]:
        if shard.names != first.names or len(shard.token_sequence) != len(first.token_sequence):
            raise ValueError(f"Shard of chain {shard.chain} belongs to another estimate "
                             f"(components {shard.names}, not {first.names})")
    sums = {}
    for name in [*first.names, FULL]:
        sums[name] = DrawSums(len(first.token_sequence), config.num_chains, config.num_draws,
                              device, kappa=first.kappa)
        for shard in shards:
            sums[name].add_chain_arrays(shard.chain, shard.sums[name])
    failed = {}
    for shard in sorted(shards, key=lambda s: s.chain):
        for name, reason in shard.failed.items():
            failed.setdefault(name, reason)
    anchor = None if first.anchor is None else torch.from_numpy(first.anchor).to(device)
    return Draws(list(first.names), sums, failed, first.token_sequence, first.token_position,
                 anchor), first.spacing
