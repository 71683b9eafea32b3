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
import copy
import gc
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------------------------
# Workloads and shared settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    vocab: int
    context: int
    num_chains: int
    num_draws: int
    batch_size: int
    probe_sequences: int
    sampling_sequences: int
    train_steps: int = 150
    repeats: int = 1  # timed runs per tool, interleaved; the median is reported
    period: int = 16
    gpu_only: bool = False


WORKLOADS = {
    "tiny": Workload("tiny", n_layer=2, n_head=4, n_embd=64, vocab=128, context=32,
                     num_chains=2, num_draws=20, batch_size=8, probe_sequences=16,
                     sampling_sequences=256, repeats=3),
    "medium": Workload("medium", n_layer=2, n_head=8, n_embd=128, vocab=2000, context=64,
                       num_chains=2, num_draws=50, batch_size=8, probe_sequences=32,
                       sampling_sequences=256),
    "paper-scale": Workload("paper-scale", n_layer=2, n_head=8, n_embd=256, vocab=5000,
                            context=128, num_chains=4, num_draws=100, batch_size=16,
                            probe_sequences=64, sampling_sequences=512, gpu_only=True),
}

# Identical SGLD hyperparameters for every tool.
STEP_SIZE = 1e-3
N_BETA = 30.0
GAMMA = 300.0
NUM_BURNIN = 0
STEPS_BETWEEN_DRAWS = 1
SEED = 0

# devinterp measures the sampling-task observable L on ``batches_per_draw * batch_size``
# fixed sequences (default batches_per_draw=3) drawn by random.Random(obs_seed); the engine
# and the plain loop measure L on that many sequences too -- the very same ones (see
# ``engine_sampling_order``).
DEVINTERP_BATCHES_PER_DRAW = 3
DEVINTERP_OBS_SEED = 1337
DEVINTERP_INIT_SEED = 100
DEVINTERP_INIT_LOSS_BATCHES = 32

MEMORY_RATIO_LIMIT = 1.2  # peak at 200 draws / peak at 50 draws

# Peak RSS with glibc's default allocator mostly measures heap retention: freed blocks of
# a few hundred KiB stay in the heap (the mmap threshold adapts upwards), so a tool that
# frees and reallocates often looks 2x bigger than its live data (medium: the engine 230 vs
# 55 MiB). "Live" memory runs extra children with a fixed 64 KiB mmap threshold (every
# larger block is returned to the OS when freed), so their peak RSS tracks live data; they
# are 2-6x slower, hence run with 1 chain and LIVE_DRAWS draws (peak memory does not depend
# on either: every code path runs at every draw).
LIVE_MMAP_THRESHOLD = 65536
LIVE_DRAWS = 3

TARGETS = {
    # (workload, metric): (comparison, threshold)
    ("medium", "engine/plain time"): ("<=", 0.75),
    ("tiny", "devinterp/engine time"): (">=", 10.0),
    ("medium", "devinterp/engine time"): (">=", 1.4),
    ("paper-scale", "devinterp/engine time"): (">=", 10.0),
}


def observable_sequences(w: Workload) -> int:
    return DEVINTERP_BATCHES_PER_DRAW * w.batch_size


# ----------------------------------------------------------------------------------------------
# Model and data (built once by the parent, saved to a temporary file, loaded by every child)
# ----------------------------------------------------------------------------------------------


def gpt2_config(w: Workload):
    from transformers import GPT2Config

    # Dropout off: devinterp samples in train mode, the engine in eval mode; with all dropout
    # probabilities 0 both sample the same posterior.
    return GPT2Config(vocab_size=w.vocab, n_positions=w.context, n_embd=w.n_embd,
                      n_layer=w.n_layer, n_head=w.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=0,
                      eos_token_id=0)


def synthetic_sequences(kind: str, count: int, w: Workload, generator) -> torch.Tensor:
    """``kind="repeat"``: a span of ``w.period`` uniformly random tokens repeated to fill the
    context (a small model learns within ~100 AdamW steps to predict the repeats by
    attending one period back and copying, so its heads matter); ``kind="random"``: uniform
    tokens, nothing to copy."""
    import torch

    if kind == "random":
        return torch.randint(0, w.vocab, (count, w.context), generator=generator)
    span = torch.randint(0, w.vocab, (count, w.period), generator=generator)
    copies = -(-w.context // w.period)
    return span.repeat(1, copies)[:, :w.context]


def build_workload_file(w: Workload, device: str, directory: Path) -> tuple[Path, dict]:
    """Train the model briefly (AdamW, lr 3e-3 with 20 warm-up steps, batch 32, on repeated
    spans; deterministic) and save everything the children need: the weights, the sampling
    data (the training distribution), the probe (half repeated spans, half random tokens).
    Returns the file and a few facts for the report."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = GPT2LMHeadModel(gpt2_config(w)).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    start = time.perf_counter()
    for _ in range(w.train_steps):
        batch = synthetic_sequences("repeat", 32, w, gen).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
    train_time = time.perf_counter() - start
    model.eval()
    sampling = synthetic_sequences("repeat", w.sampling_sequences, w, gen)
    half = w.probe_sequences // 2
    probe = torch.cat([synthetic_sequences("repeat", half, w, gen),
                       synthetic_sequences("random", w.probe_sequences - half, w, gen)])
    labels = ["repeat"] * half + ["random"] * (w.probe_sequences - half)
    with torch.no_grad():
        losses = token_losses(model, probe.to(device))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = directory / f"workload_{w.name}.pt"
    torch.save({"workload": asdict(w), "state_dict": state, "sampling": sampling,
                "probe": probe, "probe_labels": labels}, path)
    facts = {"train_time_s": train_time, "params": sum(p.numel() for p in model.parameters()),
             # loss on the repeats (predictable by copying), on the first span, on random tokens
             "loss_copy": float(losses[:half, w.period - 1:].mean()),
             "loss_first_span": float(losses[:half, :w.period - 1].mean()),
             "loss_random": float(losses[half:].mean())}
    return path, facts


def load_workload(path: str, device: str):
    import torch
    from transformers import GPT2LMHeadModel

    blob = torch.load(path, weights_only=False)
    w = Workload(**blob["workload"])
    model = GPT2LMHeadModel(gpt2_config(w))
    model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    return w, model, blob["sampling"], blob["probe"], blob["probe_labels"]


def devinterp_observable_indices(n: int, count: int) -> list[int]:
    """Rows devinterp's ``Observable`` picks (DeterministicShuffledSampler), in its order."""
    return random.Random(DEVINTERP_OBS_SEED).sample(range(n), count)


def engine_sampling_order(sampling, m: int):
    """A permutation of the sampling sequences for the engine such that the engine's fixed
    observable set (the first ``m`` rows of its private seeded permutation) is exactly
    devinterp's observable set. Minibatches are uniform over the data, so the permutation
    changes nothing else. Returns (engine data, observable rows of ``sampling``)."""
    import torch

    from susc_callback.sampler.sgld import chain_seed, make_generator

    n = len(sampling)
    wanted = devinterp_observable_indices(n, m)
    picks = torch.randperm(n, generator=make_generator(
        torch.device("cpu"), chain_seed(SEED, "observable")))
    taken = set(wanted)
    rest = [i for i in range(n) if i not in taken]
    source = torch.empty(n, dtype=torch.long)
    source[picks[:m]] = torch.tensor(wanted)
    source[picks[m:]] = torch.tensor(rest)
    return sampling[source], wanted


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def token_losses(model, input_ids):
    """(B, T-1) next-token cross-entropy, computed on the flat contiguous (B*T, V) logits
    (as the engine does; the transposed (B, V, T) layout is ~5x slower on CPU)."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, use_cache=False).logits
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(input_ids.shape)[:, :-1]


def mean_loss_no_grad(model, ids, eval_batch: int = 32) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), eval_batch):
            losses = token_losses(model, ids[i:i + eval_batch])
            total += float(losses.double().sum())
            count += losses.numel()
    return total / count


def chi_correlation(a: np.ndarray, b: np.ndarray, names: list[str]) -> dict:
    """Pearson correlation of two (components, tokens) matrices: overall, per layer, and the
    median over components of the per-row correlation."""
    def corr(x, y):
        x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or x[ok].std() == 0 or y[ok].std() == 0:
            return float("nan")
        return float(np.corrcoef(x[ok], y[ok])[0, 1])

    out = {"overall": corr(a, b)}
    layers = sorted({n.split("h")[0] for n in names})
    for layer in layers:
        rows = [i for i, n in enumerate(names) if n.split("h")[0] == layer]
        out[layer] = corr(a[rows], b[rows])
    out["median row"] = float(np.nanmedian([corr(a[i], b[i]) for i in range(len(names))]))
    return out


# ----------------------------------------------------------------------------------------------
# Tool 1: the engine
# ----------------------------------------------------------------------------------------------


def run_engine(model, w: Workload, sampling, probe, labels, *, anchor="exact"):
    from susc_callback import ProbeSet, SGLDConfig, estimate_susceptibilities

    m = observable_sequences(w)
    data, _ = engine_sampling_order(sampling, m)
    config = SGLDConfig(step_size=STEP_SIZE, n_beta=N_BETA, gamma=GAMMA,
                        num_chains=w.num_chains, num_draws=w.num_draws, num_burnin=NUM_BURNIN,
                        steps_between_draws=STEPS_BETWEEN_DRAWS, batch_size=w.batch_size,
                        observable="fixed", observable_sequences=m, anchor=anchor,
                        seed=SEED, progress=False)
    probe_set = ProbeSet.from_tensors(probe, datasets=labels)
    return estimate_susceptibilities(model, None, data, probe_set, config)


# ----------------------------------------------------------------------------------------------
# Tool 2: the plain sequential loop (reference implementation of the same estimator)
# ----------------------------------------------------------------------------------------------


def run_plain_loop(model, w: Workload, sampling, probe, *, eval_batch: int = 32):
    """One chain at a time, per component: a float32 copy of the model, full forward and full
    backward with every parameter requiring grad, gradient masked to the component, the SGLD
    update ``u <- u - eps/2 (n_beta grad + gamma (u - u*)) + sqrt(eps) N(0, I)`` on the
    masked entries, and at every draw (before the step, as the engine) the loss on the fixed
    observable set and the per-token probe losses (no grad, full forward). Streams the same
    sums as the engine's estimator. Returns (component names, chi (C, P), E_C[phi] (C,))."""
    import torch

    from susc_callback import head_components

    device = next(model.parameters()).device
    m = observable_sequences(w)
    _, obs_rows = engine_sampling_order(sampling, m)
    sampling = sampling.to(device)
    observable = sampling[torch.tensor(obs_rows, device=device)]
    probe = probe.to(device)
    anchor = mean_loss_no_grad(model, observable, eval_batch)  # exact: same sequences
    names_params = [name for name, _ in model.named_parameters()]
    components = [(c.name, {n: mask.to(device) for n, mask in c.masks.items()})
                  for c in head_components(model)]
    components.append(("full", None))
    num_tokens = probe.shape[0] * (probe.shape[1] - 1)
    sums = {}
    num_steps = NUM_BURNIN + w.num_draws * STEPS_BETWEEN_DRAWS
    noise_scale = math.sqrt(STEP_SIZE)
    for index, (name, masks) in enumerate(components):
        s = {"n": 0, "phi": 0.0, "loss": 0.0, "phi_loss": 0.0,
             "token": torch.zeros(num_tokens, dtype=torch.float64, device=device),
             "phi_token": torch.zeros(num_tokens, dtype=torch.float64, device=device)}
        for chain in range(w.num_chains):
            chain_model = copy.deepcopy(model).float().eval()
            params = [p for _, p in chain_model.named_parameters()]
            for p in params:
                p.requires_grad_(True)
            anchors = [p.detach().clone() for p in params]
            mask_list = [None if masks is None else masks.get(n) for n in names_params]
            moves = [masks is None or mk is not None for mk in mask_list]
            floats = [None if mk is None else mk.float() for mk in mask_list]
            noise_gen = torch.Generator(device=device).manual_seed(1000 * index + chain)
            batch_gen = torch.Generator().manual_seed(SEED * 7919 + chain)
            order = torch.empty(0, dtype=torch.long)
            for step in range(num_steps):
                if len(order) < w.batch_size:
                    order = torch.randperm(len(sampling), generator=batch_gen)
                rows, order = order[:w.batch_size], order[w.batch_size:]
                batch = sampling[rows.to(device)]
                loss = token_losses(chain_model, batch).mean()
                chain_model.zero_grad(set_to_none=True)
                loss.backward()
                offset = step - NUM_BURNIN
                if offset >= 0 and offset % STEPS_BETWEEN_DRAWS == 0:
                    with torch.no_grad():
                        obs_loss = mean_loss_no_grad(chain_model, observable, eval_batch)
                        parts = [token_losses(chain_model, probe[i:i + eval_batch]).reshape(-1)
                                 for i in range(0, len(probe), eval_batch)]
                        token = torch.cat(parts).double()
                    phi = obs_loss - anchor
                    s["n"] += 1
                    s["phi"] += phi
                    s["loss"] += obs_loss
                    s["phi_loss"] += phi * obs_loss
                    s["token"] += token
                    s["phi_token"] += phi * token
                with torch.no_grad():
                    for p, p0, move, mk in zip(params, anchors, moves, floats):
                        if not move:
                            continue
                        drift = p.grad.mul(N_BETA).add_(p - p0, alpha=GAMMA)
                        noise = torch.randn(p.shape, generator=noise_gen, device=device)
                        if mk is not None:
                            drift.mul_(mk)
                            noise.mul_(mk)
                        p.add_(drift, alpha=-STEP_SIZE / 2).add_(noise, alpha=noise_scale)
            del chain_model
        sums[name] = s
    full = sums.pop("full")
    names = [n for n, _ in components if n != "full"]
    full_delta = (full["token"] - full["loss"]) / full["n"]
    chi = []
    for n in names:
        s = sums[n]
        cov = (s["phi_token"] - s["phi_loss"]) / s["n"]
        chi.append((-(cov - (s["phi"] / s["n"]) * full_delta)).cpu().numpy())
    mean_phi = np.array([sums[n]["phi"] / sums[n]["n"] for n in names])
    return names, np.stack(chi), mean_phi


# ----------------------------------------------------------------------------------------------
# Tool 3: devinterp 2.0.1
# ----------------------------------------------------------------------------------------------


def run_devinterp(model, w: Workload, sampling, probe, out_dir: Path, device: str):
    """devinterp's ``susceptibilities()`` with the same settings.

    What is the same: SGLD hyperparameters (lr, n_beta, localization = gamma, no burn-in, one
    step between draws, no weight decay, noise 1), num_chains, num_draws, batch_size, the
    sampling data (as an HF Dataset), the probe sequences, the head weight restrictions
    (built from ``susc_callback.head_components`` masks), and the observable set: devinterp
    measures L on ``batches_per_draw * batch_size`` = 3 * batch_size fixed sampling
    sequences (random.Random(1337)); the engine and the plain loop use those very sequences.

    What differs: (1) devinterp anchors phi at ``init_loss``, the mean loss at w* of
    ``num_init_loss_batches`` (32) shuffled minibatches of the sampling data (here that is
    the whole sampling set), *not* of the observable set, so phi(w*) != 0; the engine's
    ``anchor="separate-batches"`` mimics this, but with ``observable_sequences`` (3 *
    batch_size) other sequences, so its offset is not the same number. (2) devinterp takes
    a draw *after* the SGLD step, the engine *before* it (a one-step shift of each chain).
    (3) Different RNG streams (noise and minibatch order), so agreement is statistical.
    (4) devinterp samples in train mode (dropout is 0 here, so no effect) and stores every
    draw's losses in zarr. ``devinterp_recompute`` re-derives devinterp's estimate from those
    stored draws with the exact anchor, which removes difference (1).
    """
    from datasets import Dataset
    from devinterp.slt.susceptibilities import susceptibilities

    from susc_callback import head_components

    sampling_ds = Dataset.from_dict({"input_ids": sampling.tolist()}).with_format("torch")
    probe_ds = Dataset.from_dict({"input_ids": probe.tolist()}).with_format("torch")
    restrictions = {c.name: {n: m.to(device) for n, m in c.masks.items()}
                    for c in head_components(model)}
    restrictions["full"] = None
    tree = susceptibilities(
        model, sampling_ds,
        observables={"train": (sampling_ds, DEVINTERP_BATCHES_PER_DRAW),
                     "probe": (probe_ds, len(probe) // w.batch_size)},
        weight_restrictions=restrictions, sampling_task="train",
        lr=STEP_SIZE, n_beta=N_BETA, localization=GAMMA, num_chains=w.num_chains,
        num_draws=w.num_draws, batch_size=w.batch_size, num_burnin_steps=NUM_BURNIN,
        num_steps_bw_draws=STEPS_BETWEEN_DRAWS, num_init_loss_batches=DEVINTERP_INIT_LOSS_BATCHES,
        init_seed=DEVINTERP_INIT_SEED, obs_seed=DEVINTERP_OBS_SEED, device=device,
        output_path=out_dir / "devinterp_samples.zarr")
    return tree


def devinterp_chi(tree, probe, names: list[str]) -> np.ndarray:
    """devinterp's (flat token, wr) matrix as (components, probe tokens) in the engine's
    token order (sequence-major; token (s, t) predicts ``probe[s, t + 1]``)."""
    sus = tree["susceptibilities"].dataset
    wr = [str(x) for x in sus["wr"].values]
    batch = np.asarray(sus["batch"].values)
    target = np.asarray(sus["target_position"].values)
    n_seq, length = probe.shape
    order = devinterp_observable_indices(n_seq, n_seq)  # devinterp's probe row -> our row
    context = tree["context"].dataset["input_ids"].values.reshape(n_seq, length)
    if not np.array_equal(context, probe.numpy()[order]):
        raise RuntimeError("devinterp probe order is not the expected one")
    columns = np.asarray(order)[batch] * (length - 1) + (target - 1)
    values = np.asarray(sus["sus"].values)
    chi = np.full((len(names), n_seq * (length - 1)), np.nan)
    for row, name in enumerate(names):
        chi[row, columns] = values[:, wr.index(name)]
    return chi


def devinterp_recompute(work: Path, names: list[str], probe, anchors: dict[str, float]
                        ) -> tuple[dict[str, np.ndarray], float]:
    """devinterp's estimator recomputed from the per-draw losses its ``sample()`` stored
    (one zarr per weight restriction), with phi anchored at each of ``anchors`` (name ->
    L(w*)); "init_loss" is added (devinterp's own anchor, which must reproduce its output).
    Returns (name -> chi (components, probe tokens) in the engine's token order, init_loss)."""
    import xarray as xr

    def load(wr):
        path = work / f"devinterp_samples_{wr}.zarr"
        return xr.open_datatree(str(path), engine="zarr", consolidated=False).dataset

    full = load("full")
    full_mean = float(full["loss_train"].values.astype(np.float64).mean())
    full_delta = full_mean - full["loss_probe"].values.astype(np.float64).mean(axis=(0, 1))
    anchors = {"init_loss": float(full["init_loss"].values.astype(np.float64).mean()),
               **anchors}
    n_seq, length = probe.shape
    order = np.asarray(devinterp_observable_indices(n_seq, n_seq))
    out = {key: np.full((len(names), n_seq * (length - 1)), np.nan) for key in anchors}
    for row, name in enumerate(names):
        ds = load(name)
        observable = ds["loss_train"].values.astype(np.float64).mean(axis=(-2, -1))
        tokens = ds["loss_probe"].values.astype(np.float64)  # (chain, draw, batch, position)
        for key, anchor in anchors.items():
            phi = observable - anchor
            sus = ((phi * observable).mean() - (phi[:, :, None, None] * tokens).mean(axis=(0, 1))
                   - phi.mean() * full_delta)  # devinterp's compute_susceptibilities
            chi = np.empty((n_seq, length - 1))
            chi[order] = sus
            out[key][row] = chi.ravel()
    return out, anchors["init_loss"]


# ----------------------------------------------------------------------------------------------
# Child process: one measured job
# ----------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    """Peak RSS of this process image. VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss
    starts at the parent's RSS at fork time (Linux carries it over fork + exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


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
    token_losses(warm, sampling[:2].to(device)).mean().backward()
    del warm
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    rss_before = _rss_bytes()
    out = {"job": spec["job"], "workload": w.name, "peak_rss_setup": _peak_rss_bytes()}
    out["reset_peak"] = _reset_peak_rss()
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
    out["peak_rss"] = _peak_rss_bytes()
    # The engine may fork chain workers (SGLDConfig.workers): their peak is not in this
    # process's; ru_maxrss of a forked child includes the pages it shares with its parent.
    scale = 1 if sys.platform == "darwin" else 1024
    out["workers_peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    if cuda:
        out["cuda_peak_increase"] = torch.cuda.max_memory_allocated() - base_alloc
    return out


# ----------------------------------------------------------------------------------------------
# Parent: orchestration and report
# ----------------------------------------------------------------------------------------------


def spawn(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--job", json.dumps(spec)]
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


def memory_increase(result: dict, baseline: dict) -> float:
    """Bytes: on CUDA the allocator's peak during the call; on CPU the child's peak RSS over
    the baseline child's peak RSS (same imports, same model and data, same warm-up)."""
    if "cuda_peak_increase" in result:
        return float(result["cuda_peak_increase"])
    return float(result["peak_rss"] - baseline["peak_rss"])


def call_increase(result: dict) -> float:
    """Bytes: the peak RSS during the call over the RSS just before it (the peak is reset
    right before the call), a cross-check of :func:`memory_increase` on CPU."""
    if "cuda_peak_increase" in result or not result.get("reset_peak"):
        return float("nan")
    return float(result["peak_rss"] - result["rss_before"])


def mem_text(result: dict, baseline: dict) -> str:
    text = f"peak +{mib(memory_increase(result, baseline))}"
    during = call_increase(result)
    if math.isfinite(during):
        text += f" (in-call: +{mib(during).strip()})"
    if result.get("workers_peak_rss"):
        text += (f"; forked chain workers: peak RSS {mib(result['workers_peak_rss']).strip()} "
                 "each, shared pages included")
    return text


def mib(x: float) -> str:
    return f"{x / 2**20:8.1f} MiB"


def verdict(value: float, op: str, threshold: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    ok = value <= threshold if op == "<=" else value >= threshold
    return "PASS" if ok else "FAIL"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="tiny,medium",
                        help="comma-separated: tiny, medium, paper-scale (GPU only)")
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
    args = parser.parse_args(argv)

    if args.job is not None:
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
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; valid: {list(WORKLOADS)}")
    with_devinterp = not args.skip_devinterp
    if with_devinterp:
        try:
            import datasets  # noqa: F401
            import devinterp  # noqa: F401
        except ImportError as error:
            print(f"devinterp comparison skipped: {error} (pip install -e '.[bench]')")
            with_devinterp = False

    load = os.getloadavg()[0]
    print(f"# bench_engine: device={device}, torch {torch.__version__}, "
          f"threads={args.threads} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}), "
          f"cpus={os.cpu_count()}, load average {load:.2f} at start")
    if device == "cpu" and args.threads > 1 and load > 0.5:
        print("# WARNING: the machine is busy; multi-threaded CPU timings will be noisy "
              "(--threads 1 is more robust)")
    print(f"# SGLD: step_size={STEP_SIZE}, n_beta={N_BETA}, gamma={GAMMA}, burn-in={NUM_BURNIN},"
          f" steps between draws={STEPS_BETWEEN_DRAWS}; all heads + full chain")
    rows: dict[tuple[str, str], dict] = {}  # (workload, tool) -> time, rss, live
    checks = []  # (workload, metric, value)
    live = device == "cpu"
    bench_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        tmp = Path(tmp)
        files = {}
        for name in names:
            w = WORKLOADS[name]
            if w.gpu_only and not device.startswith("cuda"):
                print(f"\n== {name}: skipped (GPU-only workload; device is {device})")
                continue
            path, facts = build_workload_file(w, device, tmp)
            files[name] = path
            print(f"\n== {name}: {w.n_layer} layers x {w.n_head} heads, n_embd {w.n_embd}, "
                  f"vocab {w.vocab}, context {w.context}, {facts['params']:,} params; "
                  f"{w.num_chains} chains x {w.num_draws} draws, batch {w.batch_size}, "
                  f"{w.probe_sequences} probe seqs, {w.sampling_sequences} sampling seqs, "
                  f"L on {observable_sequences(w)} fixed seqs")
            print(f"   trained {w.train_steps} AdamW steps in {facts['train_time_s']:.1f}s; probe "
                  f"loss: repeated tokens {facts['loss_copy']:.3f}, first span "
                  f"{facts['loss_first_span']:.3f}, random {facts['loss_random']:.3f} "
                  f"(log vocab {math.log(w.vocab):.3f})")

            def job(kind, tag, w=w, path=path, **extra):
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
            names_e = engine["names"]
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
                plain = runs["plain"][0]
                chi_p = np.load(tmp / f"chi_{w.name}_plain.npy")
                t_p = median_time(runs["plain"])
                rows[(w.name, "plain loop")] = {"time": t_p, "rss": memory_increase(plain, base)}
                print(f"   plain loop:               {t_p:8.2f} s  {mem_text(plain, base)}"
                      f"{spread_text(runs['plain'])}")
                ratio = t_e / t_p
                print(f"   engine/plain time = {ratio:.3f} (target <= 0.75 on medium)")
                checks.append((w.name, "engine/plain time", ratio))
                print("   corr(engine exact, plain loop): "
                      + _fmt_corr(chi_correlation(chi_e, chi_p, names_e))
                      + "  [two independent estimates of the same quantity]")
                rllc_e = N_BETA * np.array(engine["mean_phi"])
                rllc_p = N_BETA * np.array(plain["mean_phi"])
                print(f"   rLLC per head, engine: {np.array2string(rllc_e, precision=2)}")
                print(f"   rLLC per head, plain:  {np.array2string(rllc_p, precision=2)}")

            if with_devinterp:
                dev = runs["devinterp"][0]
                chi_d = np.load(tmp / f"chi_{w.name}_devinterp.npy")
                t_d = median_time(runs["devinterp"])
                rows[(w.name, "devinterp 2.0.1")] = {"time": t_d,
                                                     "rss": memory_increase(dev, base)}
                print(f"   devinterp:                {t_d:8.2f} s  {mem_text(dev, base)}"
                      f"{spread_text(runs['devinterp'])}")
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
                      + _fmt_corr(chi_correlation(chi_e, chi_d, names_e)))
                print("   corr(engine separate-batches, devinterp):       "
                      + _fmt_corr(chi_correlation(chi_s, chi_d, names_e)))
                print("   corr(engine exact, devinterp re-anchored exact): "
                      + _fmt_corr(chi_correlation(chi_e, chi_r, names_e)))
                print("   corr(engine exact, engine separate-batches):    "
                      + _fmt_corr(chi_correlation(chi_e, chi_s, names_e)))

            if live:
                tools = [("engine", "engine", {"anchor": "exact"})]
                if not args.skip_plain:
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

        if not args.skip_memory_scaling and files:
            mem_name = args.memory_workload if args.memory_workload in files else \
                next(iter(files))
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

    print(f"\n== summary (total benchmark time {time.perf_counter() - bench_start:.0f} s; "
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
    return 0


def median_time(runs: list[dict]) -> float:
    return float(np.median([r["time_s"] for r in runs]))


def spread_text(runs: list[dict]) -> str:
    """"  [median of 3: 1.90 2.02 2.31 s]" (empty for a single run)."""
    if len(runs) < 2:
        return ""
    times = " ".join(f"{t:.2f}" for t in sorted(r["time_s"] for r in runs))
    return f"  [median of {len(runs)}: {times} s]"


def _fmt_corr(c: dict) -> str:
    parts = [f"overall {c['overall']:+.3f}"]
    parts += [f"{k} {v:+.3f}" for k, v in c.items() if k not in ("overall", "median row")]
    parts.append(f"median per head {c['median row']:+.3f}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Profiling mode
# ----------------------------------------------------------------------------------------------


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
    warm = replace(w, num_draws=1, num_chains=1)
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


if __name__ == "__main__":
    sys.exit(main())
