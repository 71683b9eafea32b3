"""``--profile``: cProfile of the engine and of the plain loop on one workload."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.tools import run_engine, run_plain_loop
from bench.workloads import WORKLOADS, build_workload_file, load_workload


def profile_main(workload: str, device: str, threads: int, draws: int, chains: int) -> int:
    """cProfile of the engine and of the plain loop on one workload (fewer draws and chains
    by default: the time per step is what matters)."""
    import cProfile
    import pstats

    import torch

    if threads:
        torch.set_num_threads(threads)
    w = WORKLOADS[workload]
    with tempfile.TemporaryDirectory(prefix="bench_profile_") as tmp:
        path, _ = build_workload_file(w, device, Path(tmp))
        w, model, sampling, probe, labels = load_workload(str(path), device)
    w = replace(w, num_draws=draws or w.num_draws, num_chains=chains or w.num_chains)
    print(f"# profile: {workload} with {w.num_chains} chain(s) x {w.num_draws} draws, "
          f"threads={torch.get_num_threads()}")
    # Warm-up outside the profile: imports, first-call initialisation.
    warm = replace(w, num_draws=2, num_chains=1)
    run_engine(model, warm, sampling, probe, labels)
    run_plain_loop(model, warm, sampling, probe)
    for title, fn in (("engine", lambda: run_engine(model, w, sampling, probe, labels)),
                      ("plain loop", lambda: run_plain_loop(model, w, sampling, probe))):
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        fn()
        profiler.disable()
        print(f"\n===== {title} on {workload}: {time.perf_counter() - start:.2f} s "
              "(under cProfile) =====")
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
    return 0
