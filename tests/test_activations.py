"""Swapped activations in the engine's snapshot: same numbers, caller's model untouched."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from conftest import tiny_gpt2
from transformers.activations import FastGELUActivation, NewGELUActivation

from susc_callback import estimate_susceptibilities
from susc_callback.sampler.activations import TanhGELU, swap_activations


def _activation_types(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "GELU" in type(m).__name__}


def test_swapped_gelu_computes_the_same_function():
    x = torch.linspace(-8, 8, 10001)
    swapped = torch.nn.Sequential(NewGELUActivation(), FastGELUActivation())
    swap_activations(swapped)
    assert _activation_types(swapped) == {"TanhGELU"}
    for original in (NewGELUActivation(), FastGELUActivation()):
        torch.testing.assert_close(swapped[0](x), original(x), rtol=1e-6, atol=1e-6)


def test_tanh_gelu_matches_a_float64_reference_with_and_without_autograd():
    x = torch.linspace(-10, 10, 20001)
    x64 = x.double().requires_grad_()
    reference = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    (slope,) = torch.autograd.grad(reference.sum(), x64)
    before = x.clone()
    expected = reference.detach().float()  # compared with float32 tolerances
    with torch.no_grad():  # the in-place CPU passes (sigmoid form)
        torch.testing.assert_close(TanhGELU()(x), expected)
    assert torch.equal(x, before)  # the input is not written to
    leaf = x.clone().requires_grad_()  # with the hand-written backward
    value = TanhGELU()(leaf)
    torch.testing.assert_close(value, expected)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    torch.testing.assert_close(grad, slope.float())


def test_swapped_model_gives_the_same_logits():
    model = tiny_gpt2().eval()
    swapped = copy.deepcopy(model)
    swap_activations(swapped)
    assert _activation_types(model) == {"NewGELUActivation"}
    assert _activation_types(swapped) == {"TanhGELU"}
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(swapped(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_engine_samples_with_swapped_activations_only_in_its_snapshot(gpt2, probe, sampling_ids,
                                                                      config):
    seen = []

    def loss_fn(m, batch):
        seen.append(_activation_types(m))
        logits = m(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                               reduction="none")

    estimate_susceptibilities(gpt2, None, sampling_ids, probe, config, loss_fn=loss_fn)
    assert seen and all(types == {"TanhGELU"} for types in seen)
    assert _activation_types(gpt2) == {"NewGELUActivation"}


def test_cpu_gelu_backward_passes_a_finite_difference_check():
    from susc_callback.sampler.activations import _SigmoidGELU

    x = torch.linspace(-6, 6, 96, dtype=torch.float64).reshape(8, 12).t()  # non-contiguous
    assert not x.is_contiguous()
    assert torch.autograd.gradcheck(_SigmoidGELU.apply, (x.requires_grad_(),))
