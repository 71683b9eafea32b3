"""The processes of one ``susc`` command: one, or those that ``torchrun`` / ``accelerate
launch`` (under SLURM or not) started, joined in a ``torch.distributed`` group."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    otherwise. The ranks leave the group together at the end."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Processes(0, 1, None)
        return
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU ranks: gloo
    try:
        yield Processes(state.process_index, state.num_processes, state.device)
    except BaseException:
        dist.destroy_process_group()  # without waiting: a failed peer may never come
        raise
    dist.barrier()  # every rank leaves together: none is killed by the launcher mid-save
    dist.destroy_process_group()


def end_if_launched(status: int) -> None:
    """Under a launcher (``WORLD_SIZE`` > 1), end this process now with ``status``, its
    output flushed, without the interpreter's teardown.

    The teardown is not safe after gloo collectives: a gloo worker thread may still hold
    the last collective's tensors, and releasing them needs the GIL, which a finalizing
    interpreter no longer gives; the thread then aborts the process ("terminate called
    without an active exception", SIGABRT), and torchrun kills the other ranks. Seen in
    1 of 16 runs with 3 ranks and 4 of 10 with 6 (pytorch/pytorch#179291 describes it).
    Every file is closed and every result saved by then."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
