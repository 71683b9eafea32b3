"""Estimates whose chains run on several processes: in memory within a process group, or
through shards on disk (:mod:`.store`) for ``susc analyze``.

Chains are seeded by ``(seed, component, chain)`` and minibatches by ``(seed, chain)``, so
a chain computes the same draws on whichever rank runs it; merging adds each chain's sums
into its own rows (:mod:`.shard`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.data.sampling import LossFn
from susc_callback.estimator.engine import (
    estimate_susceptibilities,
    result_from_draws,
    sample_draws,
)
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.sharding.collectives import all_gather, on_every_rank, rank_and_world
from susc_callback.sharding.plan import rank_share, work_units
from susc_callback.sharding.shard import ChainShard, merge_shards, split_draws


def estimate_chains(model: nn.Module, components: Any, sampling_data: Any, probe: ProbeSet,
                    config: SGLDConfig, chains: list[int], *, loss_fn: LossFn | None = None,
                    collate_fn: Callable | None = None) -> list[ChainShard]:
    """The shards of chains ``chains`` of the estimate, run together in this process."""
    draws = sample_draws(model, components, sampling_data, probe, config, loss_fn=loss_fn,
                         collate_fn=collate_fn, chains=chains)
    return split_draws(draws, sorted(set(chains)))


def merged_result(shards: list[ChainShard], probe: ProbeSet, config: SGLDConfig,
                  step: int | None, device: torch.device | str = "cpu"
                  ) -> SusceptibilityResult:
    """The result of an estimate from one shard of each of its chains."""
    draws, spacing = merge_shards(shards, config, torch.device(device))
    result = result_from_draws(draws, probe, config, step)
    if spacing is not None:
        result.extra["draw_spacing"] = spacing
    return result


def estimate_distributed(model: nn.Module, components: Any, sampling_data: Any,
                         probe: ProbeSet, config: SGLDConfig | None = None, *,
                         loss_fn: LossFn | None = None, collate_fn: Callable | None = None,
                         step: int | None = None) -> SusceptibilityResult:
    """:func:`estimate_susceptibilities` with its chains shared out over the ranks of the
    initialised ``torch.distributed`` process group (a collective: every rank calls it with
    the same arguments, its model on its own device, and gets the same result). Each rank
    runs a contiguous share of the chains; with fewer chains than ranks some ranks idle.
    A rank's error is raised there and named on the others
    (:class:`~susc_callback.sharding.collectives.PeerError`). Outside a process group it is
    :func:`estimate_susceptibilities`."""
    config = config or SGLDConfig()
    rank, world = rank_and_world()
    if world == 1:
        return estimate_susceptibilities(model, components, sampling_data, probe, config,
                                         loss_fn=loss_fn, collate_fn=collate_fn, step=step)
    mine = [unit.chain for unit in rank_share(work_units([0], config.num_chains), rank, world)]
    shards = on_every_rank(lambda: estimate_chains(
        model, components, sampling_data, probe, config, mine, loss_fn=loss_fn,
        collate_fn=collate_fn) if mine else [])
    return merged_result([shard for part in all_gather(shards) for shard in part], probe,
                         config, step)
