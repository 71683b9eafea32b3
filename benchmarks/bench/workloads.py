"""Workloads: the model and data every tool sees (built once by the parent, saved to a
file, loaded by every child), and the settings every tool shares."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reference import causal_token_losses, mean_valid_loss

if TYPE_CHECKING:
    import torch


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


def observable_sequences(w: Workload) -> int:
    return DEVINTERP_BATCHES_PER_DRAW * w.batch_size


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
        losses, _ = causal_token_losses(model, probe.to(device))
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


def mean_loss_no_grad(model, ids, eval_batch: int = 32) -> float:
    """Mean next-token loss of the sequences ``ids`` at the model's weights."""
    import torch

    with torch.no_grad():
        return float(mean_valid_loss(model, {"input_ids": ids}, eval_batch))
