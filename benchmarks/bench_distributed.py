"""``susc analyze`` on 1 process against N processes (torchrun), side by side in one run.

A small series (GPT-2-style checkpoints built from a config, random token data) is
analysed from scratch with one process, then with ``--processes`` ranks (gloo on CPU, one
thread each; on a GPU machine one rank per GPU), each into its own copy of the run. It
prints the wall times (launcher start-up included), the speed-up, the parallel efficiency
(speed-up / processes) and the largest difference between the two series' chi.

    python benchmarks/bench_distributed.py [--processes 2] [--checkpoints 4] [--chains 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from susc_callback.store.run import RunStore

VOCAB, CONTEXT = 64, 32


def make_series(root: Path, checkpoints: int) -> Path:
    """``root/run`` with ``checkpoints`` checkpoints and probe / sampling JSONL beside it."""
    run = root / "run"
    for index in range(checkpoints):
        torch.manual_seed(index)
        config = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB,
                            n_positions=CONTEXT, bos_token_id=0, eos_token_id=0)
        GPT2LMHeadModel(config).save_pretrained(run / f"checkpoint-{(index + 1) * 100}")
    generator = torch.Generator().manual_seed(0)
    for name, rows in (("probe.jsonl", 16), ("train.jsonl", 64)):
        ids = torch.randint(0, VOCAB, (rows, CONTEXT), generator=generator)
        (root / name).write_text("\n".join(json.dumps({"input_ids": row, "dataset": "d"})
                                           for row in ids.tolist()))
    return run


def analyze(run: Path, processes: int, chains: int, draws: int) -> float:
    root = run.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "susc_callback", "analyze", str(run),
               "--probe", str(root / "probe.jsonl"), "--sampling-data",
               str(root / "train.jsonl"), "--num-chains", str(chains), "--num-draws",
               str(draws), "--workers", "1", "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        times, chi = {}, {}
        for processes in (1, args.processes):
            run = make_series(Path(folder) / f"p{processes}", args.checkpoints)
            times[processes] = analyze(run, processes, args.chains, args.draws)
            chi[processes] = np.stack([r.chi for r in RunStore.of_run(run).load_all()])
    speedup = times[1] / times[args.processes]
    print(f"susc analyze, {args.checkpoints} checkpoints x {args.chains} chains x "
          f"{args.draws} draws (all heads), {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}")
    print(f"  1 process:   {times[1]:.1f} s")
    print(f"  {args.processes} processes: {times[args.processes]:.1f} s")
    print(f"  speed-up {speedup:.2f}x, efficiency {speedup / args.processes:.2f}")
    difference = np.nanmax(np.abs(chi[1] - chi[args.processes]))
    print(f"  max |chi difference| {difference:.2e} (max |chi| {np.nanmax(np.abs(chi[1])):.2e})")


if __name__ == "__main__":
    main()
