"""When a prefix group's chains are stacked, and how many go into one batch.

The planner decides once per group whether its chains are stacked
(:func:`decide_stacking`) and how many chain indices advance together
(:func:`decide_chain_batch`); the chain runner falls back
to one chain at a time when a stacked step turns out to be unsupported
(:func:`refuse_stacking`). Both evaluate stacked chains in parts of at most
:class:`StackLimit` chains, a limit halved whenever a part runs out of device memory.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from susc_callback.components.component import ResolvedComponent
from susc_callback.config import SGLDConfig
from susc_callback.data.sampling import SamplingData
from susc_callback.estimator.plan import FULL
from susc_callback.sampler.group import GroupLosses
from susc_callback.sampler.sgld import ChainBank, chain_banks
from susc_callback.sampler.stacking import (
    StackingUnsupported,
    is_stackable,
    stacking_blocker,
)


class StackLimit:
    """Most chains stacked in one batch (``SGLDConfig.max_batched_chains`` at first)."""

    def __init__(self, limit: int, device: torch.device) -> None:
        self.limit, self.device = limit, device

    def parts(self, banks: list[ChainBank],
              evaluate: Callable[[list[ChainBank]], Any]) -> Iterator[tuple[list, Any]]:
        """``(part, evaluate(part))`` for consecutive parts of banks holding at most
        ``limit`` chains in all (a larger bank alone), the limit halved whenever a part
        runs out of device memory (evaluation changes no chain state, so a retry is
        exact)."""
        start = 0
        while start < len(banks):
            end, chains = start + 1, banks[start].count
            while end < len(banks) and chains + banks[end].count <= self.limit:
                chains += banks[end].count
                end += 1
            part = banks[start:end]
            try:
                result = evaluate(part)
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                self._halve(chains)
                continue
            yield part, result
            start = end

    def _halve(self, failed_size: int) -> None:
        self.limit = failed_size // 2
        warnings.warn(f"Out of memory with {failed_size} chains in one batch; continuing "
                      f"with {self.limit}", RuntimeWarning, stacklevel=4)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def refuse_stacking(config: SGLDConfig, reason: str) -> None:
    """A group's chains cannot be stacked: a clear error for ``batch_chains="on"``; with
    ``"auto"`` the caller goes on one chain at a time (evaluation changes no chain state,
    so switching is exact)."""
    if config.batch_chains == "on":
        raise ValueError(f"batch_chains='on', but this group's chains cannot be stacked: "
                         f"{reason}. Use SGLDConfig(batch_chains='off') or 'auto'")


def decide_stacking(model: nn.Module, members: list[ResolvedComponent],
                    chains: list[ChainBank], group: GroupLosses, config: SGLDConfig,
                    device: torch.device, limit: StackLimit) -> bool:
    """Whether the restricted chains of a group (``chains``, at ``w*``) are stacked: asked
    for by ``batch_chains``, worth it on this device, made of stackable modules, and
    checked against one-at-a-time evaluation (every chain, in parts of ``limit``)."""
    restricted = [c for c in members if c.name != FULL]
    if config.batch_chains == "off" or not restricted:
        return False
    if config.batch_chains == "auto" and (len(restricted) < 2 or device.type == "cpu" and
                                          len(restricted) * config.batch_size
                                          > config.eval_batch_size):
        # On a CPU stacking pays where it merges the group's minibatch passes into one of
        # at most eval_batch_size rows; larger passes cost more in cache misses than the
        # per-pass overhead they save.
        return False
    names = list(dict.fromkeys(name for c in restricted for name in c.entries))
    blocker = stacking_blocker(model, names)
    if blocker is not None:
        refuse_stacking(config, f"only parameters of Linear, Conv1D and LayerNorm modules "
                                f"can be stacked, and {blocker}")
        return False
    try:
        for _ in limit.parts(chains, group.check_stacking):
            pass
    except StackingUnsupported as error:
        refuse_stacking(config, str(error))
        return False
    return True


def decide_chain_batch(model: nn.Module, members: list[ResolvedComponent], group: GroupLosses,
                       config: SGLDConfig, data: SamplingData, device: torch.device,
                       limit: StackLimit) -> int:
    """How many chain indices of a group advance together: all members' chains stacked
    as one batch (the full chain's too). Only where chains with different indices share
    every minibatch (``batch_size >= N``) and the observable set (``"fixed"``), every
    member's parameters belong to stackable modules, a stacked evaluation of two chains of
    every member reproduces one-at-a-time evaluation, and (with ``"auto"``) a timed stacked
    step costs at most :data:`CHAIN_BATCH_GAIN` of the same chains' steps one at a time;
    else 1."""
    if config.batch_chains == "off" or config.num_chains < 2 or \
            config.batch_size < len(data) or config.observable != "fixed":
        return 1
    if any(stacking_blocker(model, list(c.entries)) is not None for c in members):
        return 1
    params = dict(model.named_parameters())
    try:
        for _ in limit.parts(chain_banks(members, params, config.seed, [0, 1], device),
                             group.check_stacking):
            pass
    except StackingUnsupported:
        return 1
    copies = min(CHAIN_BATCH_COPIES, CHAIN_BATCH_BYTES // _bytes_per_copy(model, len(data)))
    size = min(config.num_chains, max(1, copies // len(members)))
    if size < 2 or config.batch_chains == "on":
        return size
    batch = data.batch(torch.arange(len(data)), device)
    with torch.no_grad():
        hidden = group.capture(batch)
    one = chain_banks(members, params, config.seed, [0], device)
    together = chain_banks(members, params, config.seed, range(size), device)
    sequential = _seconds(lambda: group.evaluate_sequential(one, batch, hidden, False, None),
                          device)
    try:
        stacked = _seconds(lambda: group.evaluate_stacked(together, batch, hidden, False,
                                                          None), device)
    except torch.OutOfMemoryError:
        return 1
    return size if stacked <= CHAIN_BATCH_GAIN * size * sequential else 1


CHAIN_BATCH_COPIES = 1024  # most (component, chain) copies advanced together
CHAIN_BATCH_BYTES = 2**28  # and at most about this much activation memory for them
CHAIN_BATCH_GAIN = 0.5     # chain batches only where they at least halve the time per step,
                           # so that timing noise does not flip the choice (and the float
                           # rounding of results) from one run to the next


def _seconds(evaluate: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """Fastest of ``repeats`` timed calls of ``evaluate``, after one untimed call."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        evaluate()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _bytes_per_copy(model: nn.Module, rows: int) -> int:
    """Float32 activations of one copy's forward over ``rows`` rows: each stackable
    module's input and output features (the modules a chain-batched model consists of)."""
    width = sum(m.weight.shape[0] + m.weight.shape[1] if m.weight.dim() == 2
                else 2 * m.weight.shape[0] for m in model.modules() if is_stackable(m))
    return max(1, 4 * rows * width)
