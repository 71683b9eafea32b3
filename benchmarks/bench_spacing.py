"""Time to accuracy: drawing at every SGLD step (the papers' setting) against
``steps_between_draws="auto"``, side by side in one run.

On the medium workload of ``bench_engine.py`` (a 2-layer, 8-head GPT-2 briefly trained to
copy repeated spans; every head plus the full chain), each setting is run at growing
numbers of draws. For every run it records the wall time and two *split-half
reliabilities*, correlations over probe tokens between the two halves of the chains'
estimates (chains 0-1 against 2-3), averaged over the heads:

* ``raw``: of the per-token rows as they are (what issue 20 names; dominated by the
  token-to-token variation every head shares, so it is high from the first draws);
* ``structure``: of the rows after the spectroscopy standardization (each head z-scored,
  then each token centred over heads), the head-specific part that the PCs and clusters
  read, which needs many more draws.

The time each setting needs to reach each target is read off its curve (linear in log
time between the two runs that bracket it) and their ratio printed; the goal is at least
2x less time with the auto spacing. Runs of the two settings are interleaved, so a change
of the machine's load hits both alike.

Usage::

    python benchmarks/bench_spacing.py --out docs/figures   # about 15 min on 2 cores
    python benchmarks/bench_spacing.py --draws 25 50 --auto-draws 6 12
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench.workloads import (
    GAMMA,
    N_BETA,
    STEP_SIZE,
    WORKLOADS,
    build_workload_file,
    load_workload,
)
from matplotlib.figure import Figure

from susc_callback import ProbeSet, SGLDConfig, estimate_susceptibilities
from susc_callback.analysis.pca import standardize
from susc_callback.analysis.reliability import split_half_reliability

CHAINS = 4  # two chains per half
TARGETS = {"raw": (0.9, 0.98), "structure": (0.6, 0.7)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="medium", choices=sorted(WORKLOADS))
    parser.add_argument("--draws", type=int, nargs="+", default=[6, 12, 25, 50, 100])
    parser.add_argument("--auto-draws", type=int, nargs="+", default=[3, 6, 12, 25],
                        help="draws of the auto runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON + figure")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    with tempfile.TemporaryDirectory() as tmp:
        path, facts = build_workload_file(workload, "cpu", Path(tmp))
        _, model, sampling, probe_ids, labels = load_workload(str(path), "cpu")
    probe = ProbeSet.from_tensors(probe_ids, datasets=labels)
    print(f"workload {workload.name}: {facts['params']} parameters, copy loss "
          f"{facts['loss_copy']:.2f}, random-token loss {facts['loss_random']:.2f}; "
          f"{CHAINS} chains, every head + the full chain, eps {STEP_SIZE}, n_beta {N_BETA}, "
          f"gamma {GAMMA}, {args.threads} threads")
    base = SGLDConfig(step_size=STEP_SIZE, n_beta=N_BETA, gamma=GAMMA, num_chains=CHAINS,
                      batch_size=workload.batch_size, seed=0, progress=False)
    settings = {"every step": (1, args.draws), "auto": ("auto", args.auto_draws)}
    curves: dict[str, list[dict]] = {name: [] for name in settings}
    for index in range(max(len(d) for _, d in settings.values())):
        for name, (spacing, draws) in settings.items():
            if index >= len(draws):
                continue
            config = base.replace(num_draws=draws[index], steps_between_draws=spacing)
            start = time.perf_counter()
            result = estimate_susceptibilities(model, "heads", sampling, probe, config)
            seconds = time.perf_counter() - start
            spacing = result.extra.get("draw_spacing", {})
            point = {"draws": draws[index], "spacing": spacing.get("steps_between_draws", 1),
                     "predicted_gain": spacing.get("gain_over_every_step"),
                     "seconds": seconds, **reliabilities(result)}
            curves[name].append(point)
            print(f"  {name:>10}: {point['draws']:4d} draws every {point['spacing']:2d} steps"
                  f"  {seconds:7.1f} s  split-half r raw {point['raw']:.3f}, structure "
                  f"{point['structure']:.3f}", flush=True)
    times = {}
    for metric, targets in TARGETS.items():
        for target in targets:
            found = {name: time_to_reach(curve, metric, target)
                     for name, curve in curves.items()}
            times[f"{metric} {target}"] = found
            text = {name: "not reached" if t is None else f"{t:.1f} s"
                    for name, t in found.items()}
            ratio = "" if None in found.values() else \
                f"; every step / auto = {found['every step'] / found['auto']:.2f}"
            print(f"time to split-half r ({metric}) {target}: every step {text['every step']}"
                  f", auto {text['auto']}{ratio}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "spacing.json").write_text(json.dumps(
            {"curves": curves, "time_to_target": times}, indent=2))
        figure(curves).savefig(args.out / "spacing_reliability.png", dpi=120)
        print(f"wrote {args.out}")
    return 0


def reliabilities(result) -> dict[str, float]:
    """Mean split-half correlation over the heads: raw rows, and spectroscopy-standardized
    rows (the head-specific structure)."""
    raw = float(np.nanmean(split_half_reliability(result).component_r))
    a, b = (standardize(half, "spectroscopy").T for half in result.chi_halves)
    structure = float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]))
    return {"raw": raw, "structure": structure}


def time_to_reach(curve: list[dict], metric: str, target: float) -> float | None:
    """Interpolated (linear in log time) wall time at which reliability ``metric`` reaches
    ``target``, between the first run at or above it and the run before; None if no run
    reaches it. Reliability grows with the draws, up to noise."""
    points = sorted((p["seconds"], p[metric]) for p in curve)
    for (t0, r0), (t1, r1) in zip([(points[0][0], -1.0)] + points[:-1], points):
        if r1 >= target:
            if r0 < 0 or r1 == r0:
                return t1
            share = (target - r0) / (r1 - r0)
            return math.exp(math.log(t0) + share * (math.log(t1) - math.log(t0)))
    return None


def figure(curves: dict[str, list[dict]]) -> Figure:
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    for ax, (metric, targets) in zip(fig.subplots(1, 2), TARGETS.items()):
        for name, curve in curves.items():
            ax.plot([p["seconds"] for p in curve], [p[metric] for p in curve], "o-",
                    label=name)
            for p in curve:
                ax.annotate(str(p["draws"]), (p["seconds"], p[metric]), fontsize=6,
                            textcoords="offset points", xytext=(3, -8))
        for target in targets:
            ax.axhline(target, color="0.5", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel(f"split-half correlation ({metric})")
        ax.set_title(f"{metric} rows (numbers: draws per chain)", fontsize=9)
        ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
