"""One measured job (``baseline``, ``engine``, ``plain`` or ``devinterp``) in a fresh child
process, and the parent's side: :func:`spawn`."""

from __future__ import annotations

import copy
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from reference import causal_token_losses

from bench.devinterp_tool import devinterp_chi, devinterp_recompute, run_devinterp
from bench.memory import LIVE_MMAP_THRESHOLD, peak_rss_bytes, reset_peak_rss, rss_bytes
from bench.tools import run_engine, run_plain_loop
from bench.workloads import (
    engine_sampling_order,
    load_workload,
    mean_loss_no_grad,
    observable_sequences,
)

DRIVER = Path(__file__).resolve().parents[1] / "bench_engine.py"


def child_main(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import susc_callback  # noqa: F401  (imports outside the measurement)

    if spec["with_devinterp"]:
        import datasets  # noqa: F401
        import devinterp.slt.susceptibilities  # noqa: F401
    device = spec["device"]
    w, model, sampling, probe, labels = load_workload(spec["workload_file"], device)
    w = replace(w, num_draws=spec.get("num_draws") or w.num_draws,
                num_chains=spec.get("num_chains") or w.num_chains)
    # Warm-up (also part of the baseline): one forward + backward.
    warm = copy.deepcopy(model)
    causal_token_losses(warm, sampling[:2].to(device))[0].mean().backward()
    del warm
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    rss_before = rss_bytes()
    out = {"job": spec["job"], "workload": w.name, "peak_rss_setup": peak_rss_bytes()}
    out["reset_peak"] = reset_peak_rss()
    job = spec["job"]
    out_dir = Path(spec["out_dir"])
    tag = spec["tag"]
    if job == "baseline":
        elapsed = 0.0
    elif job == "engine":
        start = time.perf_counter()
        result = run_engine(model, w, sampling, probe, labels, anchor=spec["anchor"])
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        np.save(out_dir / f"chi_{tag}.npy", result.chi)
        out["names"] = list(result.component_names)
        out["anchor_loss"] = float(np.nanmean(result.anchor_loss))
        out["mean_phi"] = [float(x) for x in result.mean_phi]
        m = observable_sequences(w)
        _, rows = engine_sampling_order(sampling, m)
        out["expected_exact_anchor"] = mean_loss_no_grad(
            model, sampling[torch.tensor(rows)].to(device))
    elif job == "plain":
        start = time.perf_counter()
        names, chi, mean_phi = run_plain_loop(model, w, sampling, probe)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        np.save(out_dir / f"chi_{tag}.npy", chi)
        out["names"] = names
        out["mean_phi"] = [float(x) for x in mean_phi]
    elif job == "devinterp":
        import warnings

        warnings.filterwarnings("ignore")
        work = Path(tempfile.mkdtemp(dir=out_dir))
        start = time.perf_counter()
        tree = run_devinterp(model, w, sampling, probe, work, device)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        from susc_callback import head_components

        names = [c.name for c in head_components(model)]
        chi = devinterp_chi(tree, probe, names)
        np.save(out_dir / f"chi_{tag}.npy", chi)
        out["names"] = names
        # Re-anchor devinterp's own draws exactly (L(w*) of its observable set), to separate
        # the anchoring from the other differences (RNG, draw timing).
        _, rows = engine_sampling_order(sampling, observable_sequences(w))
        exact = mean_loss_no_grad(model, sampling[torch.tensor(rows)].to(device))
        recomputed, init_loss = devinterp_recompute(work, names, probe, {"exact": exact})
        out["init_loss"], out["exact_anchor"] = init_loss, exact
        out["recompute_error"] = float(np.nanmax(np.abs(recomputed["init_loss"] - chi)))
        out["chi_scale"] = float(np.nanmax(np.abs(chi)))
        np.save(out_dir / f"chi_{tag}_reanchored.npy", recomputed["exact"])
    else:
        raise ValueError(f"unknown job {job!r}")
    out["time_s"] = elapsed
    out["rss_before"] = rss_before
    out["peak_rss"] = peak_rss_bytes()
    # The engine may fork chain workers (SGLDConfig.workers): their peak is not in this
    # process's; ru_maxrss of a forked child includes the pages it shares with its parent.
    scale = 1 if sys.platform == "darwin" else 1024
    out["workers_peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    if cuda:
        out["cuda_peak_increase"] = torch.cuda.max_memory_allocated() - base_alloc
    return out


def spawn(spec: dict) -> dict:
    cmd = [sys.executable, str(DRIVER), "--job", json.dumps(spec)]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    if spec.get("live_memory"):
        env["MALLOC_MMAP_THRESHOLD_"] = str(LIVE_MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT_JSON "):
            result = json.loads(line[len("RESULT_JSON "):])
            if spec["job"] != "baseline":  # progress: long runs report tool by tool
                print(f"     ({spec['tag']}: {result['time_s']:.2f} s)", flush=True)
            return result
    sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-8000:] + "\n")
    raise RuntimeError(f"child job {spec['job']} ({spec['tag']}) failed "
                       f"with exit code {proc.returncode}")
