"""Side-by-side benchmark of the susceptibility engine.

Measures, in one run on one machine, for each workload (a GPT-2-style model briefly trained
to copy repeated spans, every attention head plus the full chain, identical SGLD
hyperparameters, sampling data and probe data for every tool):

1. ``susc_callback.estimate_susceptibilities`` (the engine): wall time and peak memory;
2. a plain sequential reference loop written here (one chain at a time, a float32 model
   copy per chain, full forward + full backward, gradient masked to the component, the same
   SGLD update and the same draw evaluations and estimator as the engine);
3. devinterp 2.0.1's ``susceptibilities()`` with the same settings (optional);
4. the engine's peak memory at 50 and 200 draws (it must not grow with the draws).

It also prints the correlation of the engine's per-token susceptibilities with the plain
loop's (two independent estimates of the same quantity) and with devinterp's, under both
anchorings of phi (the engine's exact anchor and its devinterp-like "separate-batches"
anchor; devinterp's own draws are also re-anchored exactly to isolate the anchor's effect),
and a final PASS/FAIL table against the targets.

Every measured job runs in a fresh child process (``--job``). Wall time is
``time.perf_counter`` around the call only; on tiny, whose runs take seconds, each tool is
timed three times, interleaved, and the median is reported (``--repeats``). Peak memory is
the child's peak RSS minus that of a baseline child which imports the same libraries and
builds the same model and data
(on CUDA: ``torch.cuda.max_memory_allocated`` during the call). On CPU, RSS with glibc's
default allocator is dominated by heap retention, so a second "live" figure is measured in
short extra children with a fixed mmap threshold (see ``LIVE_MMAP_THRESHOLD``).

Usage::

    python benchmarks/bench_engine.py                        # tiny + medium, all tools
    python benchmarks/bench_engine.py --workloads tiny --skip-devinterp
    python benchmarks/bench_engine.py --threads 1            # robust on a busy machine
    python benchmarks/bench_engine.py --device cuda --workloads tiny,medium,paper-scale
    python benchmarks/bench_engine.py --profile medium       # cProfile of engine and loop
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench.child import child_main, spawn
from bench.comparisons import compare_devinterp, compare_plain, live_memory
from bench.many_chains import bench_many_chains
from bench.memory import LIVE_MMAP_THRESHOLD, mem_text, memory_increase, mib
from bench.profiling import profile_main
from bench.report import (
    MEMORY_RATIO_LIMIT,
    TARGETS,
    median_time,
    spread_text,
    verdict,
)
from bench.workloads import (
    GAMMA,
    N_BETA,
    NUM_BURNIN,
    STEP_SIZE,
    STEPS_BETWEEN_DRAWS,
    WORKLOADS,
    Workload,
    build_workload_file,
    observable_sequences,
)

Rows = dict  # (workload, tool) -> {"time", "rss", "live"}
Checks = list  # (workload, metric, value)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.job is not None:  # a child: one measured job
        result = child_main(json.loads(args.job))
        print("RESULT_JSON " + json.dumps(result), flush=True)
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.profile:
        return profile_main(args.profile, device, args.threads, args.profile_draws,
                            args.profile_chains)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS and n != "many-chains"]
    if unknown:
        parser.error(f"unknown workloads {unknown}; valid: {list(WORKLOADS)}")
    with_devinterp = not args.skip_devinterp and _devinterp_available()
    _print_header(device, args.threads)
    rows: Rows = {}
    checks: Checks = []
    bench_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        tmp = Path(tmp)
        files = {}
        for name in names:
            if name == "many-chains":
                checks += [(name, *check) for check in bench_many_chains(
                    device, args.mc_engine_chains, args.mc_engine_draws,
                    args.mc_devinterp_chains, args.mc_devinterp_draws, with_devinterp)]
                continue
            w = WORKLOADS[name]
            if w.gpu_only and not device.startswith("cuda"):
                print(f"\n== {name}: skipped (GPU-only workload; device is {device})")
                continue
            files[name] = bench_workload(w, args, device, with_devinterp, tmp, rows, checks)
        if not args.skip_memory_scaling and files:
            bench_memory(files, args, device, with_devinterp, tmp, checks)
    print_summary(rows, checks, time.perf_counter() - bench_start)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="tiny,medium",
                        help="comma-separated: tiny, medium, paper-scale (GPU only), "
                             "many-chains (bench/many_chains.py)")
    parser.add_argument("--mc-engine-chains", type=int, default=256,
                        help="many-chains: the engine's chains (fewer than the workload's 256 "
                             "scales its time up linearly)")
    parser.add_argument("--mc-engine-draws", type=int, default=2000)
    parser.add_argument("--mc-devinterp-chains", type=int, default=1)
    parser.add_argument("--mc-devinterp-draws", type=int, default=100)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--skip-devinterp", action="store_true")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed runs of each tool per workload, interleaved, in fresh "
                             "children; the median is reported (default 0 = the workload's: "
                             "3 for tiny, whose runs take seconds and vary by 10-30%% between "
                             "runs, 1 otherwise)")
    parser.add_argument("--skip-memory-scaling", action="store_true")
    parser.add_argument("--memory-workload", default="tiny",
                        help="workload of the 50 vs 200 draws memory check (default tiny, to "
                             "keep the default run short: on 2 CPU cores medium at 200 draws "
                             "alone takes several minutes; the first workload run if not "
                             "among them)")
    parser.add_argument("--memory-chains", type=int, default=1,
                        help="chains of the memory check runs (0 = the workload's; on CPU they "
                             "run with the live-memory allocator setting, 2-6x slower)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads for every tool (default 0 = torch's "
                             "default, all cores). On a machine where other processes compete "
                             "for the cores, multi-threaded torch slows down 2-20x (spinning "
                             "OpenMP threads) and the timings become noise: use --threads 1 "
                             "there (or OMP_WAIT_POLICY=PASSIVE, which costs 15-40%% on an "
                             "idle machine)")
    parser.add_argument("--profile", default=None, metavar="WORKLOAD",
                        help="instead of the benchmark, cProfile the engine and the plain loop")
    parser.add_argument("--profile-draws", type=int, default=20,
                        help="draws per chain in --profile mode (0 = the workload's)")
    parser.add_argument("--profile-chains", type=int, default=1,
                        help="chains in --profile mode (0 = the workload's)")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    return parser


def _devinterp_available() -> bool:
    try:
        import datasets  # noqa: F401
        import devinterp  # noqa: F401
    except ImportError as error:
        print(f"devinterp comparison skipped: {error} (pip install -e '.[bench]')")
        return False
    return True


def _print_header(device: str, threads: int) -> None:
    import torch

    load = os.getloadavg()[0]
    print(f"# bench_engine: device={device}, torch {torch.__version__}, "
          f"threads={threads} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}), "
          f"cpus={os.cpu_count()}, load average {load:.2f} at start")
    if device == "cpu" and threads > 1 and load > 0.5:
        print("# WARNING: the machine is busy; multi-threaded CPU timings will be noisy "
              "(--threads 1 is more robust)")
    print(f"# SGLD: step_size={STEP_SIZE}, n_beta={N_BETA}, gamma={GAMMA}, burn-in={NUM_BURNIN},"
          f" steps between draws={STEPS_BETWEEN_DRAWS}; all heads + full chain")


def bench_workload(w: Workload, args: argparse.Namespace, device: str, with_devinterp: bool,
                   tmp: Path, rows: Rows, checks: Checks) -> Path:
    """Every tool on workload ``w``, side by side; returns the workload's file."""
    live = device == "cpu"  # and the "live" memory of every tool
    path, facts = build_workload_file(w, device, tmp)
    print(f"\n== {w.name}: {w.n_layer} layers x {w.n_head} heads, n_embd {w.n_embd}, "
          f"vocab {w.vocab}, context {w.context}, {facts['params']:,} params; "
          f"{w.num_chains} chains x {w.num_draws} draws, batch {w.batch_size}, "
          f"{w.probe_sequences} probe seqs, {w.sampling_sequences} sampling seqs, "
          f"L on {observable_sequences(w)} fixed seqs")
    print(f"   trained {w.train_steps} AdamW steps in {facts['train_time_s']:.1f}s; probe "
          f"loss: repeated tokens {facts['loss_copy']:.3f}, first span "
          f"{facts['loss_first_span']:.3f}, random {facts['loss_random']:.3f} "
          f"(log vocab {math.log(w.vocab):.3f})")

    def job(kind, tag, **extra):
        return spawn({"job": kind, "tag": f"{w.name}_{tag}", "workload_file": str(path),
                      "device": device, "out_dir": str(tmp), "threads": args.threads,
                      "with_devinterp": with_devinterp, **extra})

    base = job("baseline", "baseline")
    print(f"   baseline child: RSS {mib(base['rss_before']).strip()} after imports, model, "
          f"data and warm-up (peak so far {mib(base['peak_rss_setup']).strip()})")
    timed = [("engine", "engine_exact", {"anchor": "exact"})]
    if not args.skip_plain:
        timed.append(("plain", "plain", {}))
    if with_devinterp:
        timed.append(("devinterp", "devinterp", {}))
    repeats = args.repeats or w.repeats
    runs = {kind: [] for kind, _, _ in timed}
    for _ in range(repeats):  # interleaved, so that a slow spell hits every tool
        for kind, tag, extra in timed:
            runs[kind].append(job(kind, tag, **extra))
    engine = runs["engine"][0]
    chi_e = np.load(tmp / f"chi_{w.name}_engine_exact.npy")
    t_e = median_time(runs["engine"])
    rows[(w.name, "engine")] = {"time": t_e, "rss": memory_increase(engine, base)}
    print(f"   engine (exact anchor):    {t_e:8.2f} s  {mem_text(engine, base)}"
          f"{spread_text(runs['engine'])}")
    gap = abs(engine["anchor_loss"] - engine["expected_exact_anchor"])
    print(f"   engine L(w*) {engine['anchor_loss']:.5f} vs L(w*) of devinterp's "
          f"observable set {engine['expected_exact_anchor']:.5f} "
          f"({'same sequences' if gap < 1e-4 else 'MISMATCH: different sequences'})")

    if not args.skip_plain:
        compare_plain(w, runs["plain"], engine, chi_e, base, tmp, rows, checks)
    if with_devinterp:
        compare_devinterp(w, runs["devinterp"], engine, chi_e, t_e, base, tmp, job, rows,
                          checks)
    if live:
        live_memory(w, args.skip_plain, with_devinterp, job, rows)
    return path


def bench_memory(files: dict[str, Path], args: argparse.Namespace, device: str,
                 with_devinterp: bool, tmp: Path, checks: Checks) -> None:
    """The engine's peak memory at 50 and 200 draws: it must not grow with the draws."""
    live = device == "cpu"
    mem_name = args.memory_workload if args.memory_workload in files else next(iter(files))
    wm = WORKLOADS[mem_name]
    chains = args.memory_chains or wm.num_chains
    common = {"workload_file": str(files[mem_name]), "device": device,
              "out_dir": str(tmp), "threads": args.threads,
              "with_devinterp": with_devinterp, "live_memory": live,
              "num_chains": chains}
    print(f"\n== memory vs draws: engine on {mem_name}, {chains} chain(s), all heads"
          + (f", glibc mmap threshold {LIVE_MMAP_THRESHOLD // 1024} KiB" if live else ""))
    base = spawn({"job": "baseline", "tag": f"{mem_name}_mbase", **common})
    peaks = {}
    for draws in (50, 200):
        r = spawn({"job": "engine", "tag": f"{mem_name}_mem{draws}", "anchor": "exact",
                   "num_draws": draws, **common})
        peaks[draws] = memory_increase(r, base)
        print(f"   {draws:4d} draws: {r['time_s']:7.2f} s  {mem_text(r, base)}")
    ratio = peaks[200] / peaks[50] if peaks[50] > 0 else float("nan")
    per_draw = (len(r["names"]) + 1) * wm.probe_sequences * (wm.context - 1) * 8
    print(f"   peak(200 draws) / peak(50 draws) = {ratio:.3f}, difference "
          f"{(peaks[200] - peaks[50]) / 2**20:+.1f} MiB (must not grow with the draws; "
          f"keeping every draw's token losses would add "
          f"{150 * chains * per_draw / 2**20:.1f} MiB)")
    checks.append((mem_name, "mem 200/50 draws", ratio))


def print_summary(rows: Rows, checks: Checks, seconds: float) -> None:
    print(f"\n== summary (total benchmark time {seconds:.0f} s; "
          "peak memory = increase over a baseline child; RSS on CPU, allocator peak on CUDA)")
    print(f"{'workload':<12} {'tool':<16} {'wall time':>10} {'peak (RSS)':>12} "
          f"{'peak (live)':>12}")
    for (wname, tool), row in rows.items():
        live_text = mib(row["live"]) if "live" in row else "-"
        print(f"{wname:<12} {tool:<16} {row['time']:9.2f}s {mib(row['rss']):>12} "
              f"{live_text:>12}")
    print(f"\n{'workload':<12} {'ratio':<24} {'value':>8}  {'target':<9} result")
    for wname, metric, value in checks:
        if metric == "mem 200/50 draws":
            op, threshold = "<=", MEMORY_RATIO_LIMIT
        elif (wname, metric) in TARGETS:
            op, threshold = TARGETS[(wname, metric)]
        else:
            print(f"{wname:<12} {metric:<24} {value:8.3f}  {'-':<9} (no target)")
            continue
        print(f"{wname:<12} {metric:<24} {value:8.3f}  {op} {threshold:<6} "
              f"{verdict(value, op, threshold)}")


if __name__ == "__main__":
    sys.exit(main())
