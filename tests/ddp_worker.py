"""Run by test_callback.py under ``torchrun --nproc_per_node 2``: a CPU (gloo) DDP training
run with SusceptibilityCallback snapshotting at every checkpoint save."""

import os
import sys
from pathlib import Path

import torch.distributed as dist
from conftest import probe_set
from test_callback import make_callback, make_trainer

from susc_callback import Schedule

if __name__ == "__main__":
    out = Path(sys.argv[1])
    callback = make_callback(probe_set(), out / "tb", schedule=Schedule(on_save=True))
    make_trainer(out, [callback], max_steps=4, save_steps=2).train()
    # End without the interpreter's teardown: after gloo collectives a worker thread can
    # abort it ("terminate called without an active exception"), even after a barrier and
    # destroy_process_group (susc_callback.cli.launch.end_if_launched says why).
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
