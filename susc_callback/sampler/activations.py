"""Fast replacements for activation modules that are spelled out elementwise.

GPT-2's ``gelu_new`` (transformers' ``NewGELUActivation``) computes
``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` as about eight separate elementwise
kernels, each reading and writing the whole ``(batch, positions, 4 d)`` tensor, forward and
backward; on GPT-2 workloads the activation alone was 12-18% of the engine's time.
:class:`TanhGELU` computes the same function, equal up to float32 rounding, in fewer
and cheaper passes. The engine swaps the modules of its private float32 snapshot only,
never the caller's model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


class TanhGELU(nn.Module):
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    ``F.gelu(x, approximate="tanh")`` (one kernel) on GPUs. On a CPU it uses
    ``0.5 (1 + tanh(z)) = sigmoid(2 z)`` and computes ``x * sigmoid(2 c (x + a x^3))`` in
    in-place passes, with a hand-written backward where autograd needs one: ATen's CPU
    sigmoid is several times faster than its tanh. Measured with torch 2.13, one thread,
    on a (32, 32, 256) tensor on an AMD EPYC (AVX-512): forward without autograd 214 us
    against 447 us for ``F.gelu`` (``torch.tanh`` alone takes 694 us); forward and backward
    596 us against 1098 us. Values and gradients stay within float32 rounding of a float64
    reference (tested). On a CPU its gradient is first-order only (no double backward, no
    forward-mode AD), which is all the engine needs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.gelu(x, approximate="tanh")
        if x.requires_grad and torch.is_grad_enabled():
            return _SigmoidGELU.apply(x)
        return _gate(x).mul_(x)


def _gate(x: torch.Tensor) -> torch.Tensor:
    """``sigmoid(2c (x + a x^3))`` in five passes over a new tensor."""
    gate = x.square()
    gate.mul_(2 * _SQRT_2_OVER_PI * _CUBIC).add_(2 * _SQRT_2_OVER_PI)  # 2c (1 + a x^2)
    return gate.mul_(x).sigmoid_()


class _SigmoidGELU(torch.autograd.Function):
    """``x * s`` with ``s = sigmoid(u)``, ``u = 2c (x + a x^3)``; its derivative is
    ``s + x s (1 - s) u'`` with ``u' = 2c (1 + 3a x^2)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        gate = _gate(x)
        ctx.save_for_backward(x, gate)
        return gate * x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, gate = ctx.saved_tensors
        slope = x.square()
        slope.mul_(6 * _SQRT_2_OVER_PI * _CUBIC).add_(2 * _SQRT_2_OVER_PI)  # u'
        slope.mul_(x).mul_(gate)                                            # x s u'
        slope.addcmul_(slope, gate, value=-1)                               # x s (1 - s) u'
        return slope.add_(gate).mul_(grad)


def _fast_equivalents() -> tuple[type[nn.Module], ...]:
    """Activation module types that compute exactly :class:`TanhGELU`'s function."""
    try:
        from transformers import activations
    except ImportError:  # then no model holds transformers' activation modules either
        return ()
    # FastGELU is the same tanh approximation written as x * c * (1 + a x^2); GELUTanh
    # (formerly PytorchGELUTanh) calls F.gelu(approximate="tanh").
    names = ("NewGELUActivation", "FastGELUActivation", "GELUTanh", "PytorchGELUTanh")
    return tuple(getattr(activations, name) for name in names if hasattr(activations, name))


def swap_activations(model: nn.Module) -> None:
    """Replace, in place, every activation module of an exactly listed type by
    :class:`TanhGELU` (subclasses are left alone: they may compute something else)."""
    types = _fast_equivalents()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in types:
                setattr(parent, name, TanhGELU())
