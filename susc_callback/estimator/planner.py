"""The plan of an estimate: probe layout, prefix groups, the shared work at ``w*``, and
whether each group's chains are stacked (:class:`~.plan.EstimatePlan`).

Components are grouped by their *frozen prefix*: the number of transformer blocks that run
before any of their parameters is used. Within a group, the probe's and the observable
set's activations after that prefix are computed once and replayed at every draw
(:class:`~susc_callback.sampler.group.GroupLosses`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from susc_callback.components.architectures import block_list_path
from susc_callback.components.component import ResolvedComponent, canonical_parameter_names
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.data.sampling import LossFn, SamplingData, token_losses
from susc_callback.estimator.checks import check_finite_at_optimum, check_fits_model
from susc_callback.estimator.observable import seeded_chunks
from susc_callback.estimator.plan import FULL, EstimatePlan, GroupPlan, OptimumDraw
from susc_callback.estimator.stacking_policy import (
    StackLimit,
    decide_chain_batch,
    decide_stacking,
)
from susc_callback.sampler.group import GroupLosses
from susc_callback.sampler.prefix import PrefixReplay
from susc_callback.sampler.sgld import chain_banks


def plan_estimate(model: nn.Module, components: list[ResolvedComponent], data: SamplingData,
                  probe: ProbeSet, config: SGLDConfig, loss_fn: LossFn | None,
                  device: torch.device) -> EstimatePlan:
    """Plan the estimate of ``components`` on the snapshot ``model`` (float32, eval mode,
    frozen): everything the chains share, evaluated once."""
    params = dict(model.named_parameters())
    path = block_list_path(model)
    prefix = PrefixReplay(model, model.get_submodule(path) if path else None)
    full = ResolvedComponent(FULL, {name: None for name in params},
                             sum(p.numel() for p in params.values()), True)
    everything = [*components, full]
    size = config.eval_batch_size
    probe_chunks = [probe.batch(i, i + size, device) for i in range(0, len(probe), size)]
    observable_chunks, anchor_chunks = _observable_and_anchor_chunks(data, config, device)
    if data.column("input_ids") is None:  # tensor data was checked whole already
        for chunk in observable_chunks + anchor_chunks:
            check_fits_model(model, chunk, "sampling_data")
    # A CPU gains nothing from passes larger than eval_batch_size rows (they only miss
    # caches), so stacked chains share them; a GPU wants the largest passes that fit.
    max_rows = size if device.type == "cpu" else None
    token_sequence, token_position, probe_valid = _probe_layout(model, loss_fn, probe_chunks)
    _warn_empty_datasets(probe, token_sequence)

    def group_losses(depth: int, observable: list[dict]) -> GroupLosses:
        return GroupLosses(model, loss_fn, prefix, depth, probe_chunks, probe_valid,
                           observable, max_rows)

    anchor, optimum_draw = _evaluate_optimum(group_losses, observable_chunks, anchor_chunks,
                                             config)
    limit = StackLimit(config.max_batched_chains, device)
    groups = []
    for depth, members in _groups(model, loss_fn, prefix, probe_chunks[0],
                                  everything).items():
        with torch.no_grad():
            losses = group_losses(depth, observable_chunks if config.observable == "fixed"
                                  else [])
        restricted = [c for c in members if c.name != FULL]
        chain_batch = decide_chain_batch(model, members, losses, config, data, device, limit)
        if chain_batch > 1:
            stacked = frozenset(c.name for c in members)
            losses.max_rows = None  # small models: one pass of all chains' rows
        else:
            check = chain_banks(restricted, params, config.seed, [0], device)
            stacked = frozenset(c.name for c in restricted) if decide_stacking(
                model, members, check, losses, config, device, limit) else frozenset()
        groups.append(GroupPlan(depth, tuple(members), losses, stacked, chain_batch))
    return EstimatePlan(model, loss_fn, tuple(everything), tuple(groups), token_sequence,
                        token_position, anchor, optimum_draw, limit.limit)


def _observable_and_anchor_chunks(data: SamplingData, config: SGLDConfig,
                                  device: torch.device) -> tuple[list[dict], list[dict]]:
    """The fixed observable set and the separate anchor set (``anchor="separate-batches"``):
    disjoint sequences of one seeded permutation."""
    m = config.observable_sequences
    return (seeded_chunks(data, config, device, ("observable",), m),
            seeded_chunks(data, config, device, ("observable",), m, skip=m))


def _probe_layout(model: nn.Module, loss_fn: LossFn | None, probe_chunks: list[dict]
                  ) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
    """(sequence, position) of every valid probe token, and each chunk's validity mask,
    from the losses at ``w*``."""
    valid_masks, sequences, positions = [], [], []
    start = 0
    with torch.no_grad():
        for chunk in probe_chunks:
            losses, valid = token_losses(loss_fn, model, chunk)
            check_finite_at_optimum(losses[valid], "probe token losses")
            valid_masks.append(valid)
            rows, cols = valid.nonzero(as_tuple=True)
            sequences.append(rows.cpu() + start)
            positions.append(cols.cpu())
            start += valid.shape[0]
    if sum(len(s) for s in sequences) == 0:
        raise ValueError("The probe set has no valid tokens (all masked or too short)")
    return torch.cat(sequences).numpy(), torch.cat(positions).numpy(), valid_masks


def _warn_empty_datasets(probe: ProbeSet, token_sequence: np.ndarray) -> None:
    """Probe datasets without a valid token get NaN in every per-dataset number: say so."""
    present = {probe.datasets[s] for s in np.unique(token_sequence)}
    empty = [name for name in probe.dataset_names if name not in present]
    if empty:
        warnings.warn(f"Probe dataset(s) {empty} have no valid tokens (all masked or too "
                      "short): their per-dataset susceptibilities and PC scores are NaN",
                      stacklevel=4)


def _evaluate_optimum(group_losses: Callable[[int, list[dict]], GroupLosses],
                      observable_chunks: list[dict], anchor_chunks: list[dict],
                      config: SGLDConfig) -> tuple[torch.Tensor | None, OptimumDraw | None]:
    """What every chain of every component shares at ``w*``: the anchor ``L(w*)`` and,
    when the first draw is taken before any update, that draw."""
    first_draw_at_optimum = config.draw_at(0) is not None
    needs_observable = config.observable == "fixed" and (config.anchor == "exact"
                                                         or first_draw_at_optimum)
    with torch.no_grad():
        at_optimum = group_losses(0, observable_chunks if needs_observable else [])
        observable = at_optimum.mean(at_optimum.observable)[0] if needs_observable else None
        anchor = observable
        if config.anchor == "separate-batches":
            anchor_losses = group_losses(0, anchor_chunks)
            anchor = anchor_losses.mean(anchor_losses.observable)[0]
        for what, value in (("observable loss", observable), ("anchor loss", anchor)):
            if value is not None:
                check_finite_at_optimum(value, what)
        draw = OptimumDraw(observable, at_optimum.probe_losses()[0]) \
            if first_draw_at_optimum else None
    return anchor, draw


def _groups(model: nn.Module, loss_fn: LossFn | None, prefix: PrefixReplay, probe_chunk: dict,
            components: list[ResolvedComponent]) -> dict[int, list[ResolvedComponent]]:
    """Components keyed by how many leading blocks they leave frozen, in order of depth."""
    frozen = prefix.frozen_blocks(lambda: token_losses(loss_fn, model, probe_chunk))
    aliases: dict[str, list[str]] = {}
    for alias, name in canonical_parameter_names(model).items():
        aliases.setdefault(name, []).append(alias)
    groups: dict[int, list[ResolvedComponent]] = {}
    for component in components:
        depth = min(frozen.get(alias, 0) for name in component.entries
                    for alias in aliases[name])
        groups.setdefault(depth, []).append(component)
    return dict(sorted(groups.items()))
