"""What the benchmark compares beside the engine's timing: the plain loop, devinterp (with
both anchorings of phi), and every tool's "live" peak memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.memory import LIVE_DRAWS, LIVE_MMAP_THRESHOLD, mem_text, memory_increase, mib
from bench.report import chi_correlation, format_correlation, median_time, spread_text
from bench.workloads import N_BETA, Workload, observable_sequences

Job = Callable[..., dict]  # job(kind, tag, **spec) -> the child's result


def compare_plain(w: Workload, runs: list[dict], engine: dict, chi_e: np.ndarray,
                  base: dict, tmp: Path, rows: dict, checks: list) -> None:
    """The plain loop's time against the engine's, and the two estimates' agreement."""
    t_e = rows[(w.name, "engine")]["time"]
    names_e = engine["names"]
    plain = runs[0]
    chi_p = np.load(tmp / f"chi_{w.name}_plain.npy")
    t_p = median_time(runs)
    rows[(w.name, "plain loop")] = {"time": t_p, "rss": memory_increase(plain, base)}
    print(f"   plain loop:               {t_p:8.2f} s  {mem_text(plain, base)}"
          f"{spread_text(runs)}")
    ratio = t_e / t_p
    print(f"   engine/plain time = {ratio:.3f} (target <= 0.75 on medium)")
    checks.append((w.name, "engine/plain time", ratio))
    print("   corr(engine exact, plain loop): "
          + format_correlation(chi_correlation(chi_e, chi_p, names_e))
          + "  [two independent estimates of the same quantity]")
    rllc_e = N_BETA * np.array(engine["mean_phi"])
    rllc_p = N_BETA * np.array(plain["mean_phi"])
    print(f"   rLLC per head, engine: {np.array2string(rllc_e, precision=2)}")
    print(f"   rLLC per head, plain:  {np.array2string(rllc_p, precision=2)}")


def compare_devinterp(w: Workload, runs: list[dict], engine: dict, chi_e: np.ndarray,
                      t_e: float, base: dict, tmp: Path, job: Job, rows: dict,
                      checks: list) -> None:
    """devinterp's time against the engine's, and their agreement under both anchorings
    of phi (the engine's exact anchor and its devinterp-like separate batches)."""
    names_e = engine["names"]
    dev = runs[0]
    chi_d = np.load(tmp / f"chi_{w.name}_devinterp.npy")
    t_d = median_time(runs)
    rows[(w.name, "devinterp 2.0.1")] = {"time": t_d,
                                         "rss": memory_increase(dev, base)}
    print(f"   devinterp:                {t_d:8.2f} s  {mem_text(dev, base)}"
          f"{spread_text(runs)}")
    ratio = t_d / t_e
    print(f"   devinterp/engine time = {ratio:.2f}")
    checks.append((w.name, "devinterp/engine time", ratio))
    sep = job("engine", "engine_sep", anchor="separate-batches")
    chi_s = np.load(tmp / f"chi_{w.name}_engine_sep.npy")
    chi_r = np.load(tmp / f"chi_{w.name}_devinterp_reanchored.npy")
    exact = engine["anchor_loss"]
    print(f"   engine (separate-batches anchor): {sep['time_s']:8.2f} s")
    print(f"   L(w*) anchors: exact (the {observable_sequences(w)} observable seqs) "
          f"{exact:.5f}; engine separate-batches {sep['anchor_loss']:.5f} "
          f"(phi offset {exact - sep['anchor_loss']:+.5f}); devinterp init_loss "
          f"{dev['init_loss']:.5f} (phi offset {exact - dev['init_loss']:+.5f})")
    print(f"   devinterp chi recomputed from its stored draws: max |diff| "
          f"{dev['recompute_error']:.2e} (max |chi| {dev['chi_scale']:.2e})")
    print("   corr(engine exact, devinterp):                  "
          + format_correlation(chi_correlation(chi_e, chi_d, names_e)))
    print("   corr(engine separate-batches, devinterp):       "
          + format_correlation(chi_correlation(chi_s, chi_d, names_e)))
    print("   corr(engine exact, devinterp re-anchored exact): "
          + format_correlation(chi_correlation(chi_e, chi_r, names_e)))
    print("   corr(engine exact, engine separate-batches):    "
          + format_correlation(chi_correlation(chi_e, chi_s, names_e)))


def live_memory(w: Workload, skip_plain: bool, with_devinterp: bool, job: Job,
                rows: dict) -> None:
    """Every tool's peak memory with glibc's mmap threshold fixed (it tracks live data)."""
    tools = [("engine", "engine", {"anchor": "exact"})]
    if not skip_plain:
        tools.append(("plain loop", "plain", {}))
    if with_devinterp:
        tools.append(("devinterp 2.0.1", "devinterp", {}))
    small = {"live_memory": True, "num_draws": LIVE_DRAWS, "num_chains": 1}
    base_live = job("baseline", "live_baseline", **small)
    parts = []
    for tool, kind, extra in tools:
        r = job(kind, f"live_{kind}", **small, **extra)
        rows[(w.name, tool)]["live"] = memory_increase(r, base_live)
        parts.append(f"{tool} +{mib(rows[(w.name, tool)]['live']).strip()}")
    print(f"   live peak memory (glibc mmap threshold "
          f"{LIVE_MMAP_THRESHOLD // 1024} KiB, 1 chain x {LIVE_DRAWS} draws): "
          + ", ".join(parts))
