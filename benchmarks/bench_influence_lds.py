"""Is the influence matrix useful? The linear datamodelling score (LDS) on a task that
retrains in a second, for the BIF and for a gradient dot-product baseline.

Task: a 2-layer MLP (10 -> 32 -> 4, tanh) classifying a noisy Gaussian mixture; 200
training points, 50 held-out queries; full-batch Adam (lr 1e-2, 300 steps) from one fixed
initialisation. ``w*`` is the model trained on all 200 points.

* BIF: ``estimate_influence`` at ``w*`` (full localized posterior, per-sample
  cross-entropy), ``tau[i, q] = -Cov(l_i, l_q)``.
* Gradient dot product: ``tau[i, q] = -grad l_i(w*) . grad l_q(w*)`` (the first-order
  change of the query loss when a gradient step also follows sample ``i``).

For ``--subsets`` random halves ``S`` of the training set (seeded), the model is retrained
from the same initialisation on ``S`` alone and every query's loss recorded. A method's
prediction of a query's loss is ``sum_{i in S} tau[i, q]``; its LDS is the Spearman
correlation over subsets of prediction and actual loss, averaged over queries (with the
standard error over queries). No target on who wins.

    python benchmarks/bench_influence_lds.py [--subsets 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from susc_callback import SGLDConfig
from susc_callback.influence import estimate_influence

TRAIN, QUERIES, DIM, CLASSES, STEPS = 200, 50, 10, 4, 300


def make_data(seed: int) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=generator)
    labels = torch.randint(0, CLASSES, (TRAIN + QUERIES,), generator=generator)
    x = centres[labels] + 1.2 * torch.randn(TRAIN + QUERIES, DIM, generator=generator)
    flip = torch.rand(TRAIN + QUERIES, generator=generator) < 0.1  # some label noise
    labels = torch.where(flip, torch.randint(0, CLASSES, labels.shape, generator=generator),
                         labels)
    return ({"x": x[:TRAIN], "y": labels[:TRAIN]}, {"x": x[TRAIN:], "y": labels[TRAIN:]})


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def per_sample_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def train(seed: int, data: dict, rows: np.ndarray | None = None) -> nn.Module:
    model = make_model(seed)
    batch = data if rows is None else {k: v[rows] for k, v in data.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        optimizer.zero_grad()
        per_sample_loss(model, batch).mean().backward()
        optimizer.step()
    return model.eval()


def gradient_dot_products(model: nn.Module, train_data: dict, queries: dict) -> np.ndarray:
    def grads(data: dict) -> torch.Tensor:
        rows = []
        for i in range(len(data["y"])):
            model.zero_grad()
            per_sample_loss(model, {k: v[i:i + 1] for k, v in data.items()}).sum().backward()
            rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        return torch.stack(rows)
    return -(grads(train_data) @ grads(queries).T).numpy()


def lds(tau: np.ndarray, subsets: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Mean over queries of the Spearman correlation between predicted and actual loss,
    and its standard error over queries."""
    predicted = subsets.astype(float) @ tau  # (subsets, queries)
    scores = np.array([spearmanr(predicted[:, q], actual[:, q]).statistic
                       for q in range(tau.shape[1])])
    return float(np.nanmean(scores)), float(np.nanstd(scores) / np.sqrt(np.isfinite(
        scores).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=400)
    args = parser.parse_args()
    train_data, queries = make_data(args.seed)
    model = train(args.seed, train_data)
    with torch.no_grad():
        print(f"w*: train loss {per_sample_loss(model, train_data).mean():.3f}, query loss "
              f"{per_sample_loss(model, queries).mean():.3f}")
    start = time.perf_counter()
    config = SGLDConfig(step_size=1e-4, n_beta=float(TRAIN), gamma=1000.0, num_burnin=100,
                        num_chains=args.chains, num_draws=args.draws, batch_size=TRAIN,
                        observable="fixed", observable_sequences=TRAIN, seed=args.seed,
                        progress=False)
    result = estimate_influence(model, train_data, queries, config, loss_fn=per_sample_loss,
                                train_level="sequence", query_level="sequence")
    bif = result.influence[0]
    print(f"BIF: {args.chains} chains x {args.draws} draws in "
          f"{time.perf_counter() - start:.1f} s")
    dot = gradient_dot_products(model, train_data, queries)
    rng = np.random.default_rng(args.seed)
    subsets = np.zeros((args.subsets, TRAIN), dtype=bool)
    actual = np.zeros((args.subsets, QUERIES))
    start = time.perf_counter()
    for k in range(args.subsets):
        rows = rng.choice(TRAIN, TRAIN // 2, replace=False)
        subsets[k, rows] = True
        retrained = train(args.seed, train_data, rows)
        with torch.no_grad():
            actual[k] = per_sample_loss(retrained, queries).numpy()
    print(f"retrained on {args.subsets} random halves in {time.perf_counter() - start:.1f} s")
    for name, tau in (("BIF (-Cov, SGLD)", bif), ("gradient dot product", dot)):
        mean, error = lds(tau, subsets, actual)
        print(f"LDS {name:<22}: {mean:+.3f} +- {error:.3f} (mean over {QUERIES} queries)")


if __name__ == "__main__":
    main()
