"""The few collectives that sharded estimates and the callback need, as no-ops when not
distributed.

Every function here is a collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(items: list[T], rank: int, world: int) -> list[T]:
    """This rank's share of ``items`` (round robin, so every rank gets a similar mix)."""
    return items[rank::world]


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait until every rank gets here."""
    if rank_and_world()[1] > 1:
        dist.barrier()
