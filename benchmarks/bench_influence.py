"""Side-by-side benchmark of the influence matrix: ``estimate_influence`` vs devinterp 2.0.1.

One workload (bench_engine's "tiny" GPT-2, briefly trained on repeated spans): the
influence of ``--train`` training sequences on the 16 probe sequences (sequence rows, mean
token loss, covariance form), the full localized posterior, identical SGLD settings (step
size, n_beta, localization, chains, draws, batch size, no burn-in) for both tools.
Printed, from fresh child processes (``--job``), measured in one run:

1. wall time and peak memory (RSS over a baseline child with the same imports, model and
   data) of the engine and of devinterp's ``bif()``;
2. both tools' peak memory at 50 and 200 draws (the engine's must not grow: its sums are
   O(train x query); devinterp keeps every draw's per-token losses);
3. the correlation of the engine's matrix with devinterp's (devinterp returns ``+Cov``:
   compared as ``-Cov``), next to the engine's own seed-to-seed correlation (what two
   independent estimates of the same matrix agree to).

    pip install -e ".[bench]"
    python benchmarks/bench_influence.py [--train 64] [--draws 100] [--skip-devinterp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.memory import mib, peak_rss_bytes, rss_bytes  # noqa: E402
from bench.workloads import (  # noqa: E402
    GAMMA,
    N_BETA,
    STEP_SIZE,
    WORKLOADS,
    build_workload_file,
    load_workload,
)


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import susc_callback.influence  # noqa: F401  (imports outside the measurement)

    if spec["job"] == "devinterp":
        import devinterp.slt.bif  # noqa: F401
    w, model, sampling, probe, _ = load_workload(spec["workload_file"], "cpu")
    w = replace(w, num_draws=spec["draws"])
    train = sampling[:spec["train"]]
    rss_before = rss_bytes()
    start = time.perf_counter()
    if spec["job"] == "engine":
        matrix = run_engine(model, w, sampling, train, probe, spec["seed"])
    elif spec["job"] == "devinterp":
        matrix = run_devinterp(model, w, sampling, train, probe, Path(spec["out_dir"]))
    else:
        matrix = None
    elapsed = time.perf_counter() - start
    if matrix is not None:
        np.save(Path(spec["out_dir"]) / f"{spec['tag']}.npy", matrix)
    return {"time_s": elapsed, "peak_rss": peak_rss_bytes(), "rss_before": rss_before}


def run_engine(model, w, sampling, train, probe, seed: int) -> np.ndarray:
    from susc_callback import SGLDConfig
    from susc_callback.influence import estimate_influence

    config = SGLDConfig(step_size=STEP_SIZE, n_beta=N_BETA, gamma=GAMMA, num_burnin=0,
                        num_chains=w.num_chains, num_draws=w.num_draws,
                        batch_size=w.batch_size, seed=seed, progress=False)
    result = estimate_influence(model, train, probe, config, sampling_data=sampling,
                                train_level="sequence", query_level="sequence")
    return result.influence[0]


def run_devinterp(model, w, sampling, train, probe, out_dir: Path) -> np.ndarray:
    """devinterp's ``bif()`` on the same settings; its (all x all) covariance restricted to
    the train x query block, rows matched to ours by their token ids, as ``-Cov``."""
    from datasets import Dataset
    from devinterp.slt.bif import bif

    as_dataset = lambda ids: Dataset.from_dict(  # noqa: E731
        {"input_ids": ids.tolist()}).with_format("torch")
    observables = {"train": (as_dataset(train), len(train) // w.batch_size),
                   "query": (as_dataset(probe), len(probe) // w.batch_size)}
    out = bif(model, as_dataset(sampling), observables, lr=STEP_SIZE, n_beta=N_BETA,
              localization=GAMMA, correlation_method="sequence", compute_covariance=True,
              num_chains=w.num_chains, num_draws=w.num_draws, batch_size=w.batch_size,
              num_burnin_steps=0, device="cpu",
              output_path=out_dir / f"devinterp_{w.num_draws}.zarr")
    covariance = np.asarray(out["influences"].values)
    ids = np.asarray(out["input_ids"].values)
    row_of = {tuple(row): i for i, row in enumerate(ids.tolist())}
    train_rows = [row_of[tuple(r)] for r in train.tolist()]
    query_rows = [row_of[tuple(r)] for r in probe.tolist()]
    return -covariance[np.ix_(train_rows, query_rows)]


def spawn(spec: dict) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT_JSON "):
            return json.loads(line[len("RESULT_JSON "):])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
    raise RuntimeError(f"child {spec['tag']} failed with exit code {proc.returncode}")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--train", type=int, default=64, help="training sequences")
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--skip-devinterp", action="store_true")
    args = parser.parse_args()
    if args.job:
        print("RESULT_JSON " + json.dumps(child(json.loads(args.job))), flush=True)
        return
    w = WORKLOADS["tiny"]
    with tempfile.TemporaryDirectory() as tmp:
        path, facts = build_workload_file(w, "cpu", Path(tmp))
        print(f"workload tiny: {facts['params']} parameters, copy loss "
              f"{facts['loss_copy']:.2f} vs random {facts['loss_random']:.2f}; influence of "
              f"{args.train} training sequences on {w.probe_sequences} queries, "
              f"{w.num_chains} chains, {args.threads} threads")
        common = {"workload_file": str(path), "out_dir": tmp, "train": args.train,
                  "threads": args.threads, "seed": 0}
        runs = {"baseline": spawn({**common, "job": "baseline", "tag": "baseline",
                                   "draws": args.draws})}
        tools = ["engine"] + ([] if args.skip_devinterp else ["devinterp"])
        for tool in tools:
            for draws in sorted({args.draws, 50, 200}):
                tag = f"{tool}_{draws}"
                runs[tag] = spawn({**common, "job": tool, "tag": tag, "draws": draws})
        runs["engine_seed1"] = spawn({**common, "job": "engine", "tag": "engine_seed1",
                                      "draws": args.draws, "seed": 1})
        matrices = {tag: np.load(Path(tmp) / f"{tag}.npy") for tag in runs if tag != "baseline"}
    base = runs["baseline"]["peak_rss"]
    print(f"\n{'tool':<12}{'draws':>6}{'wall s':>9}{'peak memory':>16}")
    for tag, run in runs.items():
        if tag in ("baseline", "engine_seed1"):
            continue
        tool, draws = tag.split("_")
        print(f"{tool:<12}{draws:>6}{run['time_s']:>9.2f}{mib(run['peak_rss'] - base):>16}")
    reference = matrices[f"engine_{args.draws}"]
    print(f"\nengine seed 0 vs seed 1 (noise ceiling): r = "
          f"{correlation(reference, matrices['engine_seed1']):.3f}")
    if not args.skip_devinterp:
        engine, other = runs[f"engine_{args.draws}"], runs[f"devinterp_{args.draws}"]
        print(f"engine vs devinterp (-Cov):              r = "
              f"{correlation(reference, matrices[f'devinterp_{args.draws}']):.3f}")
        print(f"wall time devinterp / engine at {args.draws} draws: "
              f"{other['time_s'] / engine['time_s']:.2f}x")
    for tool in tools:
        grow = (runs[f"{tool}_200"]["peak_rss"] - base) / max(
            runs[f"{tool}_50"]["peak_rss"] - base, 1)
        print(f"{tool} peak memory at 200 / 50 draws: {grow:.2f}x")


if __name__ == "__main__":
    main()
