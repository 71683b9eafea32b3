"""Token data shared by the examples: synthetic sequences, and token-id rows as a dataset."""

from __future__ import annotations

import torch

VOCAB, CONTEXT = 128, 32


def repeated_spans(count: int, generator: torch.Generator) -> torch.Tensor:
    """Random first half, repeated as the second half: the second half is predictable only
    by induction (look up the previous occurrence, copy the token that followed it)."""
    half = torch.randint(0, VOCAB, (count, CONTEXT // 2), generator=generator)
    return torch.cat([half, half], dim=1)


def random_tokens(count: int, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random sequences: nothing to learn beyond the unigram distribution."""
    return torch.randint(0, VOCAB, (count, CONTEXT), generator=generator)


class LanguageModelingData(torch.utils.data.Dataset):
    """Token-id rows as Trainer examples (the model shifts ``labels`` itself)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}
