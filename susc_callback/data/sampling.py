"""Sampling data access and per-token losses.

A *batch* is a dict of tensors that the model (or the user's ``loss_fn``) consumes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from susc_callback.data.rows import batch_rows

LossFn = Callable[[nn.Module, dict], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
"""``loss_fn(model, batch)`` -> per-sample losses ``(B,)`` or ``(B, K)``, optionally with a
boolean validity mask of the same shape as a second return value."""


class SamplingData:
    """Random access to the sampling data as batches of sequences.

    Accepts an ``(N, T)`` tensor of token ids, a mapping of tensors sharing their first
    dimension (e.g. ``{"input_ids": ..., "attention_mask": ...}``), or any sequence of
    examples (a list, a torch or Hugging Face dataset) collated with ``collate_fn``.
    """

    def __init__(self, data: object, collate_fn: Callable | None = None) -> None:
        if isinstance(data, torch.Tensor):
            if data.dim() != 2 or data.is_floating_point():
                raise ValueError("sampling_data as a tensor must hold token ids of shape "
                                 f"(sequences, positions), got {data.dtype} {tuple(data.shape)}")
            data = {"input_ids": data}
        if isinstance(data, Mapping):
            sizes = {key: len(value) for key, value in data.items()}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"sampling_data tensors differ in their first dimension: {sizes}")
            self._columns = {key: torch.as_tensor(value) for key, value in data.items()}
            self._examples = None
            self._length = next(iter(sizes.values()))
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self._columns = None
            self._examples = data
            self._length = len(data)
        else:
            raise TypeError(f"Cannot use {type(data).__name__} as sampling_data: pass a token-id "
                            "tensor, a dict of tensors, or a dataset (sequence of examples)")
        if self._length == 0:
            raise ValueError("sampling_data is empty")
        self._collate = collate_fn or default_collate

    def __len__(self) -> int:
        return self._length

    def column(self, key: str) -> torch.Tensor | None:
        """The whole tensor ``key`` when the data was given as tensors, else None."""
        return None if self._columns is None else self._columns.get(key)

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The examples at ``indices`` collated into a dict of tensors on ``device``."""
        if self._columns is not None:
            batch = {key: value[indices] for key, value in self._columns.items()}
        else:
            batch = self._collate([self._examples[int(i)] for i in indices])
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
        return {key: _to_device(value, device) if isinstance(value, torch.Tensor) else value
                for key, value in batch.items()}


class EpochSampler:
    """Minibatch indices without replacement within an epoch, reshuffled each epoch."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator) -> None:
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        """The row indices of the next minibatch."""
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(self.size, generator=self.generator)
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return batch


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy from pageable host memory makes the host wait for the GPU's queue; one from
    pinned memory does not (PyTorch keeps the pinned block until the copy is done)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def causal_lm_token_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position: ``(B, T-1)`` losses and validity mask.

    Position ``t`` predicts token ``t+1``; it is valid when both tokens are real (attention
    mask 1) and, if the batch has ``labels``, when ``labels[:, t+1] != -100``.
    """
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
            input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError("The default causal-LM loss needs batch['input_ids'] as an integer "
                         f"tensor (batch, positions), got {type(input_ids).__name__}; for a "
                         "Hugging Face dataset use dataset.with_format('torch') or pass a "
                         "collate_fn")
    input_ids = input_ids.long()
    attention_mask = batch.get("attention_mask")
    position_ids = None
    if attention_mask is not None:  # positions count real tokens, so left padding is right
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False).logits
    # Cross-entropy over the flat, contiguous (B*T, V) logits (the fast kernel; a transposed
    # (B, V, T) input is several times slower). The last position has no target: ignored.
    targets = input_ids[:, 1:]
    shifted = F.pad(targets, (0, 1), value=-100)
    losses = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), reduction="none")
    losses = losses.view(input_ids.shape)[:, :-1]
    return losses, causal_lm_valid_targets(batch)


def causal_lm_valid_targets(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, T-1)``: where the default loss has a target (see :func:`causal_lm_token_losses`),
    from the batch's masks alone, without running the model."""
    input_ids = batch["input_ids"]
    valid = torch.ones((input_ids.shape[0], input_ids.shape[1] - 1), dtype=torch.bool,
                       device=input_ids.device)
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        valid = valid & attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    if "labels" in batch:
        valid = valid & (batch["labels"][:, 1:] != -100)
    return valid


def token_losses(loss_fn: LossFn | None, model: nn.Module, batch: dict
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses ``(B, K)`` and a boolean validity mask, from either loss."""
    if loss_fn is None:
        return causal_lm_token_losses(model, batch)
    out = loss_fn(model, batch)
    losses, valid = out if isinstance(out, tuple) else (out, None)
    if not isinstance(losses, torch.Tensor) or losses.dim() not in (1, 2):
        raise ValueError("loss_fn must return per-sample losses of shape (batch,) or "
                         f"(batch, K), got {getattr(losses, 'shape', type(losses).__name__)}")
    rows = batch_rows(batch)
    if rows is not None and losses.shape[0] != rows:
        raise ValueError(f"loss_fn returned {losses.shape[0]} per-sample losses for a batch of "
                         f"{rows} samples; return one per sample: shape (batch,) or (batch, K)")
    if losses.dim() == 1:
        losses = losses[:, None]
        valid = None if valid is None else valid[:, None]
    if valid is None:
        valid = torch.ones_like(losses, dtype=torch.bool)
    if valid.shape != losses.shape:
        raise ValueError(f"loss_fn returned a validity mask of shape {tuple(valid.shape)} for "
                         f"losses of shape {tuple(losses.shape)}; they must match")
    return losses.float(), valid.bool()
