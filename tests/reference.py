"""Plain references the engine is checked against (tests) and timed against (benchmarks).

Nothing here imports pytest, so ``benchmarks/`` imports it too (with ``tests/`` on
``sys.path``). The loop is written the obvious way: one chain at a time on its own float32
copy of the model, a full forward and backward with every parameter requiring grad, and the
SGLD update applied to the component's entries only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from susc_callback.sampler.sgld import noise_block_steps  # a convention (block size), not math

Masks = dict[str, "torch.Tensor | None"]


def causal_token_losses(model: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy ``(B, T-1)`` and its validity mask: position ``t`` predicts
    token ``t+1`` and is valid when both are real tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    losses = losses.view(input_ids.shape)[:, :-1]
    valid = torch.ones_like(losses, dtype=torch.bool)
    if attention_mask is not None:
        valid &= attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    return losses, valid


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """A ``loss_fn`` for the engine: per-token next-token losses ``(B, T-1)`` of
    ``batch["input_ids"]`` (no mask)."""
    return causal_token_losses(model, batch["input_ids"])[0]


def reference_chain(model: nn.Module, masks: Masks, next_batch: Callable[[], dict], *,
                    num_steps: int, step_size: float, n_beta: float, gamma: float,
                    noise: torch.Generator, draw_at: Callable[[int], bool],
                    on_draw: Callable[[nn.Module], None]) -> None:
    """One SGLD chain restricted to ``masks`` (``{parameter: bool mask or None}``; the
    others stay at ``w*``), the plain way: at every step the mean valid-token loss of
    ``next_batch()`` and its full backward; at a step where ``draw_at(step)``,
    ``on_draw(chain_model)`` sees the weights *before* that step's update; then::

        u <- u - step_size / 2 * (n_beta * grad + gamma * (u - u*)) + sqrt(step_size) * xi

    on the component's entries, ``xi`` drawn from ``noise`` for those entries only: the
    engine's convention, a block of ``(B, d)`` standard normals every ``B`` steps
    (``B = noise_block_steps(d)``, ``d`` the component's entries), row ``t mod B`` for step
    ``t``, split over the parameters in the order of ``masks``."""
    work = copy.deepcopy(model).float().eval()
    params = dict(work.named_parameters())
    start = {name: p.detach().clone() for name, p in params.items()}
    sizes = [params[name].numel() if mask is None else int(mask.sum())
             for name, mask in masks.items()]
    block = noise_block_steps(sum(sizes))
    device = next(iter(params.values())).device
    for step in range(num_steps):
        if step % block == 0:
            rows = torch.randn((block, sum(sizes)), generator=noise, device=device)
        xis = rows[step % block].split(sizes)
        batch = next_batch()
        losses, valid = causal_token_losses(work, batch["input_ids"],
                                            batch.get("attention_mask"))
        loss = losses[valid].mean()
        work.zero_grad()
        loss.backward()
        if draw_at(step):
            with torch.no_grad():
                on_draw(work)
        with torch.no_grad():
            for (name, mask), xi in zip(masks.items(), xis):
                p = params[name]
                chosen = torch.ones_like(p, dtype=torch.bool) if mask is None else mask
                u, u0 = p[chosen], start[name][chosen]
                p[chosen] = u - step_size / 2 * (n_beta * p.grad[chosen] + gamma * (u - u0)) \
                    + math.sqrt(step_size) * xi


def mean_valid_loss(model: nn.Module, batch: dict, eval_batch: int = 32) -> torch.Tensor:
    """Token-weighted mean loss of ``batch`` (float64), in passes of ``eval_batch`` rows."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    count = 0
    for i in range(0, len(ids), eval_batch):
        losses, valid = causal_token_losses(model, ids[i:i + eval_batch],
                                            None if mask is None else mask[i:i + eval_batch])
        total += losses[valid].double().sum()
        count += int(valid.sum())
    return total / count


def probe_token_losses(model: nn.Module, probe: dict, eval_batch: int = 32) -> torch.Tensor:
    """Losses of every valid probe token, sequence-major (the engine's token order)."""
    ids, mask = probe["input_ids"], probe.get("attention_mask")
    parts = []
    for i in range(0, len(ids), eval_batch):
        losses, valid = causal_token_losses(model, ids[i:i + eval_batch],
                                            None if mask is None else mask[i:i + eval_batch])
        parts.append(losses[valid].double())
    return torch.cat(parts)
