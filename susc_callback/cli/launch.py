"""The processes of one ``susc`` command: one, or those that ``torchrun`` / ``accelerate
launch`` (under SLURM or not) started, joined in a ``torch.distributed`` group."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits at a collective for the others: the longest is for the slowest
# rank's share of the chains (one unit more than another's, each unit a chain of every
# component), far beyond torch's default of 10 to 30 minutes on a large model. A rank
# that dies is noticed by the launcher, not by this timeout.
WAIT_FOR_PEERS = timedelta(hours=24)
_joined = False  # whether this process joined a launcher's group (end_if_launched)


@dataclass(frozen=True)
class Processes:
    """This process's ``rank`` of ``world`` and the device it samples on (None: the
    configured one, else the model's)."""

    rank: int
    world: int
    device: torch.device | None

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def launched_processes() -> Iterator[Processes]:
    """Join the launcher's process group (``WORLD_SIZE`` > 1: set by ``torchrun`` and
    ``accelerate launch``) through accelerate's ``PartialState``, which picks the backend
    (NCCL on GPUs, gloo on CPUs) and this rank's device (``cuda:LOCAL_RANK``); one process
    otherwise. The group is left again at the end."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Processes(0, 1, None)
        return
    from accelerate import PartialState

    global _joined
    state = PartialState(cpu=not torch.cuda.is_available(),  # CPU ranks: gloo
                         timeout=WAIT_FOR_PEERS)
    _joined = True
    try:
        yield Processes(state.process_index, state.num_processes, state.device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def end_if_launched(status: int) -> None:
    """After :func:`launched_processes` joined a process group, end this process now with
    ``status``, its output flushed, without the interpreter's teardown.

    The teardown is not safe after gloo collectives: a gloo worker thread may still hold
    the last collective's tensors, and releasing them needs the GIL, which a finalizing
    interpreter no longer gives; the thread then aborts the process ("terminate called
    without an active exception", SIGABRT), and torchrun kills the other ranks. Seen in
    1 of 16 runs with 3 ranks and 4 of 10 with 6 (pytorch/pytorch#179291 describes it).
    Every file is closed and every result saved by then."""
    if not _joined:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
