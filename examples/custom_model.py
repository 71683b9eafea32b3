"""Susceptibilities of any ``nn.Module`` with your own per-sample loss and components.

A small MLP regressor is fitted to a function with two regimes; the incoming weights of
two halves of its hidden units (masked rows of one matrix) and its output layer are the
components. Took 14 s on a shared 2-core machine (2026-12), imports included:

    python examples/custom_model.py
"""

from __future__ import annotations

import torch
from torch import nn

from susc_callback import Component, ProbeSet, SGLDConfig, estimate_susceptibilities


def per_sample_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Squared error of every sample, shape (batch,): one 'probe token' per sample."""
    return (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 2)
    y = torch.where(x[:, 0] > 0, torch.sin(3 * x[:, 1]), x[:, 1] ** 2)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(1500):
        loss = per_sample_loss(model, {"x": x, "y": y}).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"fitted: mean squared error {loss.item():.3f}")

    first_half = torch.arange(16) < 8
    components = [
        Component("units0-7", {"0.weight": first_half[:, None].expand(16, 2),
                               "0.bias": first_half}),
        Component("units8-15", {"0.weight": ~first_half[:, None].expand(16, 2),
                                "0.bias": ~first_half}),
        Component("output", {"2.weight": None, "2.bias": None}),
    ]
    left, right = x[:, 0] <= 0, x[:, 0] > 0
    probe = ProbeSet.from_batch(
        {"x": torch.cat([x[left][:20], x[right][:20]]),
         "y": torch.cat([y[left][:20], y[right][:20]])},
        datasets=["x0<=0"] * 20 + ["x0>0"] * 20)
    config = SGLDConfig(step_size=1e-4, n_beta=100, gamma=100, num_chains=4, num_draws=100,
                        batch_size=64, observable_sequences=128, eval_batch_size=128)
    result = estimate_susceptibilities(model, components, {"x": x, "y": y}, probe, config,
                                       loss_fn=per_sample_loss)
    print("component " + "".join(f"{d:>12}" for d in result.dataset_names) + "      rLLC")
    for name, row, rllc in zip(result.component_names, result.dataset_chi, result.rllc):
        print(f"{name:10}" + "".join(f"{v:12.5f}" for v in row) + f"{rllc:10.3f}")


if __name__ == "__main__":
    main()
