"""Where the engine's time goes on a GPU: ``python benchmarks/profile_gpu.py [workload]``.

Builds a bench_engine workload (default paper-scale) on CUDA, times one chain x 20 draws,
profiles that run with ``torch.profiler`` (GPU kernel time against wall time, the kernels
and host calls that cost most), then times the whole estimate in true float32 and with
TF32 allowed, and compares the two results.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench.tools import run_engine  # noqa: E402
from bench.workloads import WORKLOADS, build_workload_file, load_workload  # noqa: E402

import susc_callback.estimator.engine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", nargs="?", default="paper-scale",
                        choices=sorted(WORKLOADS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    workload = WORKLOADS[args.workload]
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = build_workload_file(workload, "cuda", Path(tmp))
        workload, model, sampling, probe, labels = load_workload(str(path), "cuda")

    def timed(w, label):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = run_engine(model, w, sampling, probe, labels)
        torch.cuda.synchronize()
        print(f"{label}: {time.perf_counter() - start:.2f} s", flush=True)
        return result

    small = replace(workload, num_chains=1, num_draws=20)
    timed(replace(workload, num_chains=1, num_draws=2), "warm-up")
    timed(small, "1 chain x 20 draws")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed(small, "1 chain x 20 draws, under the profiler")
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))

    ieee = timed(workload, f"{workload.name}, true float32")
    # let the TF32 setting through
    susc_callback.estimator.engine.ieee_float32 = contextlib.nullcontext
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    tf32 = timed(workload, f"{workload.name}, TF32 allowed")
    a, b = ieee.chi.ravel(), tf32.chi.ravel()
    print(f"chi, float32 vs TF32: correlation {np.corrcoef(a, b)[0, 1]:.5f}, "
          f"max |diff| {np.abs(a - b).max():.3e}, max |chi| {np.abs(a).max():.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
