"""Which process computes which chains of which checkpoint.

The unit of work is one chain of one checkpoint, with every component: the components of
a chain share its minibatches, the frozen prefix of each group and the full chain that
every component's estimate needs, so splitting them across processes would run that
shared work once per process. Units cost the same within a series (one model, one
setting), so a balanced plan gives every rank the same number of units, within one.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby


@dataclass(frozen=True, order=True)
class WorkUnit:
    """Chain ``chain`` of the checkpoint at training step ``step``."""

    step: int
    chain: int


def work_units(steps: list[int], num_chains: int) -> list[WorkUnit]:
    """Every chain of every step, in (step, chain) order."""
    return [WorkUnit(step, chain) for step in sorted(steps) for chain in range(num_chains)]


def rank_share(units: list[WorkUnit], rank: int, world: int) -> list[WorkUnit]:
    """Rank ``rank``'s units of ``world``: a contiguous run of the sorted units, sizes
    within one of each other. Contiguous, so that a rank loads few checkpoints and runs
    its chains of one checkpoint together (one plan, chain-batched where possible)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    ordered = sorted(units)
    return ordered[rank * len(ordered) // world:(rank + 1) * len(ordered) // world]


def by_step(units: list[WorkUnit]) -> dict[int, list[int]]:
    """``{step: [chains]}`` of ``units``, in step order."""
    return {step: [unit.chain for unit in group]
            for step, group in groupby(sorted(units), key=lambda unit: unit.step)}
