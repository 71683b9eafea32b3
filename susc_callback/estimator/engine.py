"""``estimate_susceptibilities``: the engine's one entry point.

It checks the inputs (:mod:`.checks`), samples on a private float32 eval-mode snapshot (the
caller's model, its flags and every global RNG stream are left exactly as they were, also
when an error is raised), plans the estimate (:mod:`.planner`: probe layout, prefix groups,
the shared work at ``w*``, stacking), runs the chains (:mod:`.runner`), in forked CPU
workers where that pays (:mod:`.workers`), and assembles the result from the running sums.
Activations the snapshot spells out elementwise (GPT-2's ``gelu_new``) are replaced by
faster equivalents of the same function (:mod:`susc_callback.sampler.activations`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.data.sampling import LossFn
from susc_callback.estimator.checks import check_inputs
from susc_callback.estimator.moments import LossCrossMoments
from susc_callback.estimator.plan import FULL
from susc_callback.estimator.planner import plan_estimate
from susc_callback.estimator.progress import chain_progress
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.estimator.runner import ChainRunner
from susc_callback.estimator.spacing import DrawSpacing, choose_spacing, cost_ratio, pilot_config
from susc_callback.estimator.sums import DrawSums
from susc_callback.estimator.workers import fork_is_safe, run_forked
from susc_callback.sampler.activations import swap_activations
from susc_callback.sampler.divergence import ChainDivergedError
from susc_callback.sampler.isolation import ieee_float32, preserved_rng_state

__all__ = ["ChainDivergedError", "Draws", "check_inputs", "estimate_susceptibilities",
           "result_from_draws", "sample_draws"]


def estimate_susceptibilities(
    model: nn.Module,
    components: Any,
    sampling_data: Any,
    probe: ProbeSet,
    config: SGLDConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    collate_fn: Callable | None = None,
    step: int | None = None,
) -> SusceptibilityResult:
    """Per-token susceptibilities of every component on every probe token.

    Args:
        model: any ``nn.Module`` at the checkpoint ``w*``; never modified.
        components: None (every attention head of a supported HF causal LM), a preset name
            (``"heads"``, ``"attention"``, ``"mlp"``, ``"layers"``, ``"embedding"``,
            ``"unembedding"``, comma-separated), :class:`Component` objects, or
            ``{name: {parameter name: bool mask or None}}``.
        sampling_data: the data SGLD samples with: an ``(N, T)`` token-id tensor, a dict of
            tensors with a common first dimension, or a sequence of examples (with
            ``collate_fn``).
        probe: the probe sequences whose per-token losses are observed.
        config: SGLD and estimator hyperparameters (default :class:`SGLDConfig`).
        loss_fn: ``loss_fn(model, batch) -> (B,) or (B, K)`` per-sample losses (optionally
            ``(losses, valid_mask)``); default: next-token cross-entropy of a causal LM.
        collate_fn: collates examples of ``sampling_data`` into a batch dict.
        step: training step of the checkpoint, stored in the result.

    Returns:
        A :class:`SusceptibilityResult` with ``chi`` of shape (components, probe tokens);
        negative entries mean the component expresses the token's pattern.
    """
    config = config or SGLDConfig()
    drawn = sample_draws(model, components, sampling_data, probe, config, loss_fn=loss_fn,
                         collate_fn=collate_fn)
    return result_from_draws(drawn, probe, config, step)


def result_from_draws(drawn: Draws, probe: ProbeSet, config: SGLDConfig, step: int | None
                      ) -> SusceptibilityResult:
    """The result of an estimate from its draws' sums (all chains', possibly merged from
    several processes)."""
    result = SusceptibilityResult.from_sums(
        {name: drawn.sums[name] for name in drawn.names}, drawn.sums[FULL], probe,
        drawn.token_sequence, drawn.token_position, drawn.anchor, config, step, drawn.failed)
    if drawn.spacing is not None:
        result.extra["draw_spacing"] = drawn.spacing.to_dict()
    return result


@dataclass
class Draws:
    """What the chains of an estimate leave: the components' names (in row order), the
    running sums of every component (and of the full chain, under ``FULL``), the
    components that failed, the plan's probe layout
    and fixed ``L(w*)`` (None when it varied per draw), and the spacing chosen for
    ``steps_between_draws="auto"``."""

    names: list[str]
    sums: dict[str, DrawSums]
    failed: dict[str, str]
    token_sequence: np.ndarray
    token_position: np.ndarray
    anchor: torch.Tensor | None
    spacing: DrawSpacing | None = None


def sample_draws(model: nn.Module, components: Any, sampling_data: Any, probe: ProbeSet,
                 config: SGLDConfig, *, loss_fn: LossFn | None = None,
                 collate_fn: Callable | None = None,
                 moments: Callable[[np.ndarray, np.ndarray, torch.device],
                                   Callable[[], LossCrossMoments]] | None = None,
                 full_chain_only: bool = False, chains: Sequence[int] | None = None
                 ) -> Draws:
    """Check the inputs, run every chain and return the running sums (the engine without
    the result assembly, for estimates other than ``chi``). ``moments(token_sequence,
    token_position, device)`` returns a factory of the cross-moments each component's
    sums keep, given the plan's probe-token layout and the device the chains run on. An
    empty ``components`` list runs the full chain alone (with ``moments``, or
    ``full_chain_only``). ``chains``: run only these chain indices (None: all of
    ``config.num_chains``); the others' sums stay empty, to be added from elsewhere
    (:mod:`susc_callback.sharding`). Chains are seeded by index, so a chain's draws do not
    depend on which others run with it."""
    chains = _chain_indices(chains, config.num_chains)
    spacing = None
    if config.steps_between_draws == "auto":
        pilot = sample_draws(model, [], sampling_data, probe, pilot_config(config),
                             loss_fn=loss_fn, collate_fn=collate_fn, full_chain_only=True)
        spacing = choose_spacing(pilot.sums[FULL].probe_trace.cpu().numpy(),
                                 cost_ratio(config, len(probe)))
        config = config.replace(steps_between_draws=spacing.steps_between_draws)
    device = torch.device(config.device) if config.device else _model_device(model)
    # Gradients are needed even when the caller is inside no_grad() or inference_mode().
    with preserved_rng_state(device), ieee_float32(), torch.inference_mode(False), \
            torch.enable_grad():
        # (collating may draw random numbers: inside preserved_rng_state)
        resolved, data = check_inputs(model, components, sampling_data, probe, config,
                                      loss_fn=loss_fn, collate_fn=collate_fn,
                                      allow_no_components=full_chain_only
                                      or moments is not None)
        snapshot = _float32_snapshot(model, device)
        plan = plan_estimate(snapshot, resolved, data, probe, config, loss_fn, device)
        factory = moments(plan.token_sequence, plan.token_position, device) if moments \
            else None
        runner = ChainRunner(plan, data, config, device, factory)
        sums, failed = _run_chains(runner, config, device, chains)
        return Draws([c.name for c in resolved], sums, failed, plan.token_sequence,
                     plan.token_position, plan.anchor, spacing)


def _chain_indices(chains: Sequence[int] | None, num_chains: int) -> list[int]:
    if chains is None:
        return list(range(num_chains))
    chosen = sorted(set(chains))
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_chains:
        raise ValueError(f"chains={list(chains)} must be a non-empty set of chain indices in "
                         f"0..{num_chains - 1} (SGLDConfig.num_chains={num_chains})")
    return chosen


def _run_chains(runner: ChainRunner, config: SGLDConfig, device: torch.device,
                chains: list[int]) -> tuple[dict[str, DrawSums], dict[str, str]]:
    """The chains ``chains`` of the plan, in this process or shared out to forked workers;
    the merged sums and the failed components."""
    workers = min(_worker_count(config, device), len(chains))
    total = len(runner.plan.components) * len(chains) * config.num_steps
    with chain_progress(total, config.progress) as bar:
        if workers == 1:
            return runner.run(chains, bar.update), runner.failed
        shares = [chains[k::workers] for k in range(workers)]
        parts = run_forked(lambda share, progress: (runner.run(share, progress),
                                                    runner.failed), shares, bar.update)
    sums, failed = parts[0][0], {}
    for share, (part, part_failed) in zip(shares, parts):
        failed.update(part_failed)
        for name, part_sums in part.items():
            if part_sums is not sums[name]:
                sums[name].merge(part_sums, share)
    return sums, failed


def _worker_count(config: SGLDConfig, device: torch.device) -> int:
    """Processes that run chains at the same time (``SGLDConfig.workers``)."""
    if config.workers == "auto":
        count = min(config.num_chains, torch.get_num_threads())
        return count if count > 1 and fork_is_safe(device) else 1
    count = min(config.workers, config.num_chains)
    if count > 1 and not fork_is_safe(device):
        raise ValueError(f"workers={config.workers} needs a CPU device on Linux, in a process "
                         "with no other non-daemon Python thread, outside torch.distributed; "
                         "use workers=1 or 'auto'")
    return count


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    raise ValueError("The model has no parameters")


def _float32_snapshot(model: nn.Module, device: torch.device) -> nn.Module:
    """A private float32 eval-mode copy with frozen parameters and faster activations."""
    snapshot = deepcopy(model).to(device=device, dtype=torch.float32).eval()
    for param in snapshot.parameters():
        param.requires_grad_(False)
        param.grad = None
    swap_activations(snapshot)
    return snapshot
