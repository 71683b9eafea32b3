"""Training with patterning weights: a pool whose examples carry per-token loss weights,
and a ``Trainer`` whose loss uses them.

Weights are aligned with the labels, as in Hugging Face's causal-LM loss: ``loss_weights
[s, j]`` weights the loss of predicting token ``j`` of sequence ``s`` (so the probe token
``(s, t)`` of a result, which predicts ``t + 1``, has its weight at ``j = t + 1``;
position 0 predicts nothing). The loss of a batch is ``sum_j w_j l_j / sum_j w_j`` over its
valid tokens. With gradient accumulation the weights are scaled to mean 1 within each
micro-batch, and then the Trainer's token-count normalisation (``num_items_in_batch``)
applies as for the plain loss. A batch whose weights are all 1 takes the Trainer's own loss
path, so an all-ones run is bitwise the plain run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer

from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.patterning.inverse import PatterningPlan

WEIGHTS_KEY = "loss_weights"


def token_weight_table(plan: PatterningPlan, result: SusceptibilityResult) -> torch.Tensor:
    """``(S, T)`` loss weights of the probe sequences that ``plan`` was made for: the plan's
    weight at every probe token's target position, 1 elsewhere."""
    table = torch.ones(result.probe_input_ids.shape, dtype=torch.float32)
    table[torch.as_tensor(result.token_sequence), torch.as_tensor(result.token_position + 1)] \
        = torch.as_tensor(plan.token_weights, dtype=torch.float32)
    return table


class WeightedPool(Dataset):
    """The pool of sequences (``{"input_ids": (S, T), ...}``) as a training dataset whose
    examples carry their row of ``weights`` under ``"loss_weights"``. ``set_weights``
    replaces the table in place, so a running Trainer (data loader workers = 0) trains on
    the new weights from its next batch on."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], weights: torch.Tensor | None = None
                 ) -> None:
        self.tensors = {key: torch.as_tensor(value) for key, value in tensors.items()}
        rows, positions = self.tensors["input_ids"].shape
        self.weights = torch.ones((rows, positions))
        if weights is not None:
            self.set_weights(weights)

    def set_weights(self, weights: torch.Tensor) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != self.weights.shape:
            raise ValueError(f"loss weights of shape {tuple(weights.shape)} for a pool of shape "
                             f"{tuple(self.weights.shape)}; one weight per token")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("loss weights must be finite and >= 0")
        self.weights.copy_(weights)

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {key: value[index] for key, value in self.tensors.items()}
        item.setdefault("labels", item["input_ids"])
        item[WEIGHTS_KEY] = self.weights[index]
        return item


class PatternedTrainer(Trainer):
    """A ``Trainer`` for causal LMs whose batches may carry ``"loss_weights"`` (from a
    :class:`WeightedPool`): the weighted loss of this module's docstring. With
    ``mixture_sampler`` (a :class:`~susc_callback.patterning.mixture.MixtureSampler`) the
    training batches are drawn by it instead: mixture weights applied by sampling."""

    def __init__(self, *args: Any, mixture_sampler: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixture_sampler = mixture_sampler

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        if self.mixture_sampler is not None:
            return self.mixture_sampler
        return super()._get_train_sampler(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if WEIGHTS_KEY not in self._signature_columns:  # keep the column in the batches
            self._signature_columns.append(WEIGHTS_KEY)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        weights = inputs.pop(WEIGHTS_KEY, None)
        if weights is None or bool((weights == 1).all()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels", inputs["input_ids"])
        outputs = model(**inputs)
        loss = weighted_causal_lm_loss(outputs.logits, labels, weights, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def weighted_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                            num_items_in_batch: Any = None) -> torch.Tensor:
    """``sum w l / sum w`` over the valid targets (labels != -100) of next-token
    cross-entropy; with ``num_items_in_batch``, the weights scaled to mean 1 over this
    micro-batch and the sum divided by it (the Trainer's accumulation convention)."""
    targets, weights = labels[:, 1:], weights[:, 1:].to(logits.device, torch.float32)
    valid = targets != -100
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                             targets.flatten().masked_fill(~valid.flatten(), 0),
                             reduction="none").view(targets.shape)
    weights = torch.where(valid, weights, 0.0)
    total = weights.sum()
    if not bool(total > 0):
        raise ValueError("a batch whose valid tokens all have loss weight 0: its weighted loss "
                         "is undefined; keep some weight on every batch (min_weight > 0)")
    if num_items_in_batch is None:
        return (weights * losses).sum() / total
    scaled = weights * (valid.sum() / total)
    return (scaled * losses).sum() / num_items_in_batch


def weight_summary(weights: np.ndarray) -> dict[str, float]:
    """Scalars that describe a weight vector: its range, spread and how many are 0."""
    weights = np.asarray(weights, dtype=np.float64)
    return {"min": float(weights.min()), "max": float(weights.max()),
            "std": float(weights.std()), "zero_share": float((weights == 0).mean())}
