"""Diverging chains: flagged on the device, reported earliest first, raised or marked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    causal_lm_loss,
    estimate,
)
from torch import nn

from susc_callback import (
    ChainDivergedError,
    Component,
    ProbeSet,
    SGLDConfig,
    head_components,
)
from susc_callback.sampler.divergence import DivergenceWatch


def test_divergence_marked_and_other_components_kept(gpt2, probe, sampling_ids, config):
    heads = head_components(gpt2)
    poison = Component("poison", {"transformer.h.0.mlp.c_fc.weight": None})
    c_fc = gpt2.transformer.h[0].mlp.c_fc.weight.detach().clone()
    wte = gpt2.transformer.wte.weight.detach().clone()

    def loss_fn(m, batch):
        """NaN whenever only the poison component has moved."""
        losses = causal_lm_loss(m, batch)
        poisoned = (not torch.equal(m.transformer.h[0].mlp.c_fc.weight, c_fc)
                    and torch.equal(m.transformer.wte.weight, wte))
        return losses * (float("nan") if poisoned else 1.0)

    with pytest.warns(RuntimeWarning, match="component 'poison' diverged at step 1"):
        result = estimate(gpt2, probe, sampling_ids, config.replace(on_divergence="mark"),
                           components=[heads[3], poison], loss_fn=loss_fn)
    assert list(result.failed) == ["poison"]
    assert np.isnan(result.chi[1]).all() and np.isfinite(result.chi[0]).all()
    with pytest.raises(ChainDivergedError, match="Lower step_size or raise gamma"):
        estimate(gpt2, probe, sampling_ids, config, components=[poison], loss_fn=loss_fn)


def test_divergence_watch_reports_the_first_bad_step_of_each_chain_once():
    """Flags are read in blocks of steps; the first bad step, chain and value are named;
    a chain is reported once, the other chains of its bank are not reported."""
    watch = DivergenceWatch(num_steps=40, device=torch.device("cpu"))
    loss = torch.tensor([2.0, 2.0])
    for step in range(40):
        tokens = torch.ones(2, 5, dtype=torch.float64)  # any float dtype
        if step >= 22:
            tokens[1, 3] = float("nan")
        weights = torch.ones(2, 6)
        if step >= 30:
            weights[0, 4] = -float("inf")
        draw = step % 2 == 0  # observable and tokens only at draws
        watch.record("a", [0, 5], step, loss if draw else None, tokens if draw else None,
                     loss, torch.ones(2, 3))
        watch.record("b", [0, 5], step, None, None, loss, weights)
        if step == 15:
            assert watch.diverged(16) == []
        if step == 35:
            assert watch.diverged(36) == [("a", 5, 22, "non-finite probe token losses"),
                                          ("b", 0, 30, "non-finite weights")]
    assert watch.diverged(40) == []


class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _run_poisoned(poison, refuse_nonfinite=False, **changes):
    """Components ``a`` and ``b``; the minibatch loss of component ``name``'s chain 0 is NaN
    at its ``poison[name]``-th evaluation with grad (its step, until a step is re-run).
    ``refuse_nonfinite``: like a loss with argument validation, raise on non-finite
    weights."""
    calls = {}

    def loss_fn(m, batch):
        if refuse_nonfinite and not all(bool(torch.isfinite(p).all()) for p in m.parameters()):
            raise ValueError("non-finite weights reached the loss")
        losses = 0.5 * ((batch["y"] - m(batch["x"])) ** 2).sum(-1)
        moving = [n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad]
        if torch.is_grad_enabled() and len(moving) == 1:
            step = calls[moving[0]] = calls.get(moving[0], -1) + 1
            if poison.get(moving[0]) == step:
                losses = losses * float("nan")
        return losses

    generator = torch.Generator().manual_seed(1)
    data = {"x": torch.randn(32, 4, generator=generator),
            "y": torch.randn(32, 2, generator=generator)}
    probe = ProbeSet.from_batch({"x": torch.randn(5, 4, generator=generator),
                                 "y": torch.randn(5, 2, generator=generator)})
    config = SGLDConfig(**{**dict(num_chains=1, num_draws=40, batch_size=4,
                                  observable_sequences=4, step_size=1e-4, n_beta=1.0, gamma=1.0,
                                  progress=False, batch_chains="off"), **changes})
    components = [Component(n, {f"{n}.weight": None}) for n in ("a", "b")]
    return estimate(_TwoLinear(), probe, data, config, components,
                                     loss_fn=loss_fn)


def test_the_earliest_divergence_is_reported_first():
    """Divergence flags are read every 16 steps; within one read, earliest step first."""
    with pytest.raises(ChainDivergedError, match="component 'b' diverged at step 3"):
        _run_poisoned({"a": 10, "b": 3})
    with pytest.warns(RuntimeWarning) as caught:
        result = _run_poisoned({"a": 10, "b": 3}, on_divergence="mark")
    messages = [str(w.message) for w in caught if "diverged" in str(w.message)]
    assert ["'b' diverged at step 3" in messages[0], "'a' diverged at step 10" in messages[1]] \
        == [True, True]
    assert list(result.failed) == ["b", "a"]
    # draws from the first bad step on are blanked (here one draw per step)
    for row, bad_step in ((1, 3), (0, 10)):
        trace = result.loss_traces[row, 0]
        assert np.isfinite(trace[:bad_step]).all() and np.isnan(trace[bad_step:]).all()


def test_a_diverged_chain_that_makes_the_loss_raise_is_dropped():
    """A chain evaluated with non-finite weights before its divergence is read back: the
    step is re-run without it, and the other component is kept."""
    with pytest.warns(RuntimeWarning, match="component 'a' diverged at step 0"):
        result = _run_poisoned({"a": 0}, refuse_nonfinite=True, on_divergence="mark")
    assert list(result.failed) == ["a"] and np.isfinite(result.chi[1]).all()
