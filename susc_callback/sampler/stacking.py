"""Chain stacking: evaluate ``G`` restricted chains as one batch of ``G x B`` rows.

The chains of a prefix group differ from ``w*`` only in their own components' entries.
Stacking repeats every input ``G`` times along the batch dimension (copy ``j`` for chain
``j``) and makes each module that owns a chain-specific parameter apply chain ``j``'s
values to the ``j``-th block of rows: a batched matmul for ``nn.Linear`` and transformers'
``Conv1D``, a per-block affine map for ``nn.LayerNorm``. Every other module runs unchanged
on the larger batch. One forward and one backward then serve all ``G`` chains: fewer,
larger kernels and one pass of Python overhead instead of ``G``. Unlike ``torch.func.vmap``
nothing but the owning modules is transformed, so it pays on a CPU too.

Stacking is exact only if every use of a stacked parameter goes through its module's
forward with the batch as leading dimension. :func:`stacking_blocker` checks the module
types; :class:`StackedModules` checks the leading dimension of every call;
:func:`susc_callback.sampler.group.check_stacking` compares a stacked evaluation with one-at-a-time
evaluations before the engine relies on it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from susc_callback.sampler.patching import patched_forward

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


class StackingUnsupported(RuntimeError):
    """A stacked module was called in a way stacking cannot reproduce exactly."""


Owners = dict[int, list[tuple[nn.Module, str]]]


def parameter_owners(model: nn.Module) -> Owners:
    """``id(parameter) -> [(module, attribute name)]`` over every module that holds it
    (tied parameters have several owners)."""
    owners: Owners = {}
    for module in model.modules():
        for attribute, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, attribute))
    return owners


def is_stackable(module: nn.Module) -> bool:
    """Whether stacking can apply per-chain values to ``module``'s parameters."""
    if type(module) is nn.LayerNorm:
        return len(module.normalized_shape) == 1
    return type(module) is nn.Linear or (Conv1D is not None and type(module) is Conv1D)


def stacking_blocker(model: nn.Module, names: list[str]) -> str | None:
    """Why the parameters ``names`` cannot be stacked (a module that is not a plain
    Linear, Conv1D or LayerNorm owns one of them), or None when they can."""
    owners = parameter_owners(model)
    for name in names:
        for module, _ in owners[id(model.get_parameter(name))]:
            if not is_stackable(module):
                return f"{name} belongs to a {type(module).__name__}"
    return None


class StackedModules:
    """Within :meth:`applied`, the modules owning ``values``' parameters use chain ``j``'s
    values (``values[name][j]``, shape ``(G, *param.shape)``) on rows block ``j``.
    ``owners`` is :func:`parameter_owners` of ``model``, computed once rather than per step."""

    def __init__(self, model: nn.Module, values: dict[str, torch.Tensor],
                 owners: Owners) -> None:
        self.count = len(next(iter(values.values())))
        self.stacked: dict[nn.Module, dict[str, torch.Tensor]] = {}
        for name, value in values.items():
            for module, attribute in owners[id(model.get_parameter(name))]:
                self.stacked.setdefault(module, {})[attribute] = value
        self.rows = 0

    def applied(self, rows: int) -> AbstractContextManager[None]:
        """Patch the owning modules for one call on a batch of ``rows = G * B`` rows."""
        self.rows = rows
        return patched_forward({module: self._forward(module, values)
                                for module, values in self.stacked.items()})

    def _blocks(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(G, rows_per_chain, features)``."""
        if x.dim() < 2 or x.shape[0] != self.rows:
            raise StackingUnsupported(
                f"{type(module).__name__} called on a tensor of shape {tuple(x.shape)}, "
                f"not on the {self.rows} stacked batch rows")
        return x.reshape(self.count, -1, x.shape[-1])

    def _forward(self, module: nn.Module, values: dict[str, torch.Tensor]
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
        def param(attribute: str) -> torch.Tensor | None:
            if attribute in values:
                return values[attribute]
            own = getattr(module, attribute)
            return None if own is None else own.unsqueeze(0).expand(self.count, *own.shape)

        weight, bias = param("weight"), param("bias")

        def forward(x: torch.Tensor) -> torch.Tensor:
            blocks = self._blocks(module, x)
            if isinstance(module, nn.LayerNorm):
                out = F.layer_norm(blocks, module.normalized_shape, None, None, module.eps)
                out = out * weight.unsqueeze(1)
                if bias is not None:
                    out = out + bias.unsqueeze(1)
            else:  # Linear: weight (out, in); Conv1D: weight (in, out)
                matrix = weight.transpose(1, 2) if isinstance(module, nn.Linear) else weight
                out = torch.bmm(blocks, matrix) if bias is None else \
                    torch.baddbmm(bias.unsqueeze(1), blocks, matrix)
            return out.reshape(*x.shape[:-1], out.shape[-1])

        return forward
