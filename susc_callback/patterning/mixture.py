"""Per-dataset mixture weights applied by sampling: a sampler over a labelled pool.

A weight ``w_d`` multiplies dataset ``d``'s own share of the pool: the probability of
drawing a sequence of ``d`` is ``share_d w_d / sum_e share_e w_e``, uniform within the
dataset. So weights 1 draw from the pool as it is (with replacement). In expectation the
gradient is the one of the loss weighted by ``w``: sampling and loss weighting realise the
same mixture, with more variance and less compute per useful token respectively.
Indices are drawn ``chunk`` at a time from the current weights, so :meth:`set_weights`
during training applies from the next chunk on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler


class MixtureSampler(Sampler[int]):
    """Pool indices drawn with per-dataset mixture weights (see the module docstring)."""

    def __init__(self, datasets: Sequence[str], weights: Mapping[str, float] | None = None,
                 num_samples: int | None = None, chunk: int = 256, seed: int = 0) -> None:
        self.labels = list(datasets)
        self.names = sorted(set(self.labels))
        labels = torch.tensor([self.names.index(d) for d in datasets])
        self.members = [torch.nonzero(labels == i).flatten() for i in range(len(self.names))]
        self.shares = torch.tensor([len(m) / len(labels) for m in self.members],
                                   dtype=torch.float64)
        self.num_samples = num_samples or len(labels)
        self.chunk, self.seed, self.epoch = chunk, seed, 0
        self.weights = torch.ones(len(self.names), dtype=torch.float64)
        if weights is not None:
            self.set_weights(weights)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the mixture weights (datasets not named keep theirs)."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"Mixture weights for unknown datasets {unknown}; the pool has "
                             f"{self.names}")
        new = self.weights.clone()
        for name, value in weights.items():
            new[self.names.index(name)] = float(value)
        if not torch.isfinite(new).all() or (new < 0).any() or not (new > 0).any():
            raise ValueError(f"Mixture weights must be finite, >= 0 and not all 0, got "
                             f"{dict(zip(self.names, new.tolist()))}")
        self.weights = new

    def probabilities(self) -> dict[str, float]:
        """The current probability of drawing a sequence of each dataset."""
        mass = self.shares * self.weights
        return dict(zip(self.names, (mass / mass.sum()).tolist()))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        for start in range(0, self.num_samples, self.chunk):
            count = min(self.chunk, self.num_samples - start)
            mass = self.shares * self.weights
            picks = torch.multinomial(mass / mass.sum(), count, replacement=True,
                                      generator=generator)
            for dataset in picks.tolist():
                members = self.members[dataset]
                yield int(members[torch.randint(len(members), (1,), generator=generator)])
