"""Losses and gradients of one *prefix group* of restricted chains at one SGLD step.

A prefix group is the set of components that leave the same leading blocks frozen. Its
probe and observable-set activations after those blocks are captured once
(:class:`GroupLosses`) and replayed for every chain and draw. Two ways to evaluate the
chains of a group at a step, with the same numbers up to float rounding:

* :func:`evaluate_sequential` loads one chain at a time into the shared snapshot;
* :func:`evaluate_batched` stacks the chains' values of the parameters they touch and runs
  one ``torch.func.vmap`` forward/backward for all of them (fewer, larger kernels: the
  main lever on a GPU, where small models are launch-bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from susc_callback.data import LossFn, mean_loss, token_losses
from susc_callback.prefix import PrefixReplay
from susc_callback.sampler import RestrictedChain


@dataclass
class ChainStep:
    """What one chain needs from one step: its minibatch loss and gradients, and at a draw
    the observable loss ``L`` and probe token losses ``l`` (P,)."""

    loss: torch.Tensor
    grads: list[torch.Tensor]
    observable: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


Forward = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]
"""``batch -> (losses, valid)``: the snapshot's current weights, or substituted ones."""


class TokenLosses(nn.Module):
    """``batch -> (losses, valid)`` as a module, so ``functional_call`` can swap weights."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return token_losses(self.loss_fn, self.model, batch)


class GroupLosses:
    """Loss evaluations of one prefix group, with its frozen prefix replayed.

    ``depth`` blocks are frozen; the probe's and observable set's activations after them
    are captured at construction, and each minibatch's by :meth:`capture`.
    """

    def __init__(self, losses: TokenLosses, prefix: PrefixReplay, depth: int,
                 probe_chunks: list[dict], probe_valid: list[torch.Tensor],
                 observable_chunks: list[dict]) -> None:
        self.losses = losses
        self.prefix, self.depth = prefix, depth
        self.probe = [(c, self.capture(c), v.reshape(-1).nonzero().squeeze(1))
                      for c, v in zip(probe_chunks, probe_valid)]
        self.observable = [(c, self.capture(c)) for c in observable_chunks]

    def capture(self, batch: dict) -> torch.Tensor | None:
        """The frozen prefix's output on ``batch`` (None when nothing is frozen)."""
        return self.prefix.capture(self.depth, lambda: self.losses(batch))

    def mean(self, chunks: list[tuple[dict, torch.Tensor | None]],
             forward: Forward | None = None) -> torch.Tensor:
        """Token-weighted mean loss over ``chunks`` (float64); ``forward`` defaults to the
        snapshot's current weights."""
        forward = forward or self.losses
        total, count = 0.0, 0
        for chunk, hidden in chunks:
            with self.prefix.replay(self.depth, hidden):
                losses, valid = forward(chunk)
            total = total + torch.where(valid, losses, 0.0).double().sum((-2, -1))
            count = count + valid.sum((-2, -1))
        return total / count.clamp(min=1)

    def probe_losses(self, forward: Forward | None = None) -> torch.Tensor:
        """Per-token probe losses ``(..., P)`` in probe-token order."""
        forward = forward or self.losses
        parts = []
        for chunk, hidden, positions in self.probe:
            with self.prefix.replay(self.depth, hidden):
                losses, _ = forward(chunk)
            parts.append(losses.flatten(-2).index_select(-1, positions))
        return torch.cat(parts, dim=-1)

    def observable_loss(self, forward: Forward | None = None) -> torch.Tensor:
        """Mean loss of the fixed observable set (float64)."""
        return self.mean(self.observable, forward)


def evaluate_sequential(chains: list[RestrictedChain], group: GroupLosses, batch: dict,
                        hidden: torch.Tensor | None, draw: bool,
                        minibatch_observable: bool) -> list[ChainStep]:
    """One chain at a time: load its values, forward/backward, evaluate, restore ``w*``."""
    steps = []
    for chain in chains:
        chain.load()
        try:
            with group.prefix.replay(group.depth, hidden):
                loss = mean_loss(*group.losses(batch))
            if loss.requires_grad:  # unused parameters get zero gradients
                grads = list(torch.autograd.grad(loss, chain.params, allow_unused=True,
                                                 materialize_grads=True))
            else:  # the loss does not depend on this component at all
                grads = [torch.zeros_like(param) for param in chain.params]
            step = ChainStep(loss.detach(), grads)
            if draw:
                with torch.no_grad():
                    step.observable = step.loss if minibatch_observable else \
                        group.observable_loss()
                    step.tokens = group.probe_losses()
        finally:
            chain.unload()
        steps.append(step)
    return steps


def evaluate_batched(chains: list[RestrictedChain], group: GroupLosses, batch: dict,
                     hidden: torch.Tensor | None, draw: bool,
                     minibatch_observable: bool) -> list[ChainStep]:
    """All chains at once: ``vmap`` over their stacked values of the touched parameters."""
    names = list(dict.fromkeys(name for chain in chains for name in chain.names))
    model = group.losses.model
    stacked = {f"model.{name}": _stack(model.get_parameter(name), name, chains)
               for name in names}

    def forward(params: dict[str, torch.Tensor], data: dict) -> tuple[torch.Tensor, ...]:
        return functional_call(group.losses, params, (data,))

    def minibatch_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        with group.prefix.replay(group.depth, hidden):
            return mean_loss(*forward(params, batch))

    grads, losses = vmap(grad_and_value(minibatch_loss))(stacked)
    observables = tokens = None
    if draw:
        with torch.no_grad():
            observables = losses if minibatch_observable else vmap(
                lambda p: group.observable_loss(lambda d: forward(p, d)))(stacked)
            tokens = vmap(lambda p: group.probe_losses(lambda d: forward(p, d)))(stacked)
    steps = []
    for j, chain in enumerate(chains):
        step = ChainStep(losses[j], [grads[f"model.{name}"][j] for name in chain.names])
        if draw:
            step.observable, step.tokens = observables[j], tokens[j]
        steps.append(step)
    return steps


def _stack(param: torch.Tensor, name: str, chains: list[RestrictedChain]) -> torch.Tensor:
    """``(G, *shape)``: copy ``j`` holds chain ``j``'s values of parameter ``name`` (w*
    where chain ``j`` does not own the entries)."""
    stacked = param.detach().unsqueeze(0).repeat(len(chains), *([1] * param.dim()))
    for j, chain in enumerate(chains):
        if name in chain.names:
            chain.write_into(name, stacked[j])
    return stacked
