"""Probe sets: the token sequences whose per-token losses are observed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProbeSet:
    """Probe sequences with a dataset label per sequence.

    Attributes:
        input_ids: ``(sequences, positions)`` long tensor.
        attention_mask: ``(sequences, positions)`` 0/1 tensor, or None (all real tokens).
        datasets: one label per sequence, e.g. ``"code"`` or ``"prose"``.

    With the default next-token loss, probe token ``(s, t)`` is the loss of predicting
    ``input_ids[s, t + 1]`` from ``input_ids[s, :t + 1]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    datasets: tuple[str, ...]

    def __post_init__(self) -> None:
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError("ProbeSet.input_ids must be an integer tensor of shape "
                             f"(sequences, positions), got {_describe(ids)}")
        if ids.shape[0] == 0 or ids.shape[1] < 2:
            raise ValueError(f"ProbeSet needs >= 1 sequence of >= 2 tokens, got {tuple(ids.shape)}")
        mask = self.attention_mask
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
            raise ValueError(f"ProbeSet.attention_mask has shape {_describe(mask)}, "
                             f"input_ids has {tuple(ids.shape)}")
        if len(self.datasets) != ids.shape[0]:
            raise ValueError(f"ProbeSet has {ids.shape[0]} sequences but {len(self.datasets)} "
                             "dataset labels")

    @classmethod
    def from_tensors(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     datasets: str | Sequence[str] = "probe") -> ProbeSet:
        """Build from token ids; ``datasets`` is one label for all or one per sequence."""
        input_ids = torch.as_tensor(input_ids).long().cpu()
        if isinstance(datasets, str):
            datasets = [datasets] * (input_ids.shape[0] if input_ids.dim() else 0)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).long().cpu()
        return cls(input_ids, attention_mask, tuple(str(d) for d in datasets))

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, datasets: str | Sequence[str] = "probe",
                   max_length: int | None = None) -> ProbeSet:
        """Tokenize ``texts`` with a HF tokenizer: right-padded with id 0 and masked,
        truncated to ``max_length``. The tokenizer is not modified."""
        if isinstance(texts, str):
            raise TypeError("from_texts expects a list of texts, got a single string")
        encoded = [tokenizer(text, truncation=max_length is not None,
                             max_length=max_length)["input_ids"] for text in texts]
        width = max((len(ids) for ids in encoded), default=0)
        input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
        attention_mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        return cls.from_tensors(input_ids, attention_mask, datasets)

    @property
    def dataset_names(self) -> list[str]:
        """Distinct dataset labels in order of first appearance."""
        return list(dict.fromkeys(self.datasets))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, start: int, stop: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Sequences ``start:stop`` as a model input dict on ``device``."""
        batch = {"input_ids": self.input_ids[start:stop].to(device)}
        if self.attention_mask is not None:
            batch["attention_mask"] = self.attention_mask[start:stop].to(device)
        return batch


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
