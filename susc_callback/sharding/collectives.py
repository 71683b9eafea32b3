"""The few collectives that sharded estimates and the callback need, as no-ops when not
distributed.

Every function here is a collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
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


class PeerError(RuntimeError):
    """The error another rank raised, named on this one."""


def on_every_rank(compute: Callable[[], T]) -> T:
    """``compute()`` on every rank. A rank's error is raised there and named on every other
    rank (:class:`PeerError`), so that no rank waits forever at its next collective for
    one that failed alone (e.g. a file missing on one node)."""
    value, error = None, None
    try:
        value = compute()
    except Exception as caught:  # reported to every rank first
        error = caught
    reports = all_gather(_report(error))
    if error is not None:
        raise error
    for rank, report in enumerate(reports):
        if report is not None:
            raise PeerError(f"rank {rank}: {report}")
    return value


def on_main(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0; its value on every rank, or its error raised on rank 0
    and named on the others (:class:`PeerError`)."""
    value, error = None, None
    if rank_and_world()[0] == 0:
        try:
            value = compute()
        except Exception as caught:  # reported to every rank first
            error = caught
    value, report = broadcast_from_main((value, _report(error)))
    if error is not None:
        raise error
    if report is not None:
        raise PeerError(f"main rank: {report}")
    return value


def _report(error: Exception | None) -> str | None:
    """What other ranks are told of ``error``: text, since an exception may not survive
    pickling."""
    return None if error is None else str(error) or type(error).__name__
