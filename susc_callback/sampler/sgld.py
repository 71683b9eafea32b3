"""Weight-restricted SGLD: the update rule and one chain over a component's entries."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from susc_callback.components.component import ResolvedComponent


def sgld_update(entries: list[torch.Tensor], grads: list[torch.Tensor],
                anchors: list[torch.Tensor], *, step_size: float, n_beta: float, gamma: float,
                generator: torch.Generator) -> None:
    """One SGLD step, in place, on flat tensors of a component's entries::

        u <- u - (step_size / 2) * (n_beta * grad + gamma * (u - anchor))
               + sqrt(step_size) * N(0, I)

    ``entries`` = u, ``grads`` = dL/du of the mean minibatch loss, ``anchors`` = u* (the
    checkpoint's values). Noise is drawn only for the entries that move, tensor by tensor.
    The arithmetic uses PyTorch's multi-tensor (``_foreach``) kernels, as ``torch.optim``
    does: on a GPU each operation is one launch for all of the component's tensors.
    """
    drift = torch._foreach_mul(grads, n_beta)
    torch._foreach_add_(drift, torch._foreach_sub(entries, anchors), alpha=gamma)
    noise = [torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
             for u in entries]
    torch._foreach_add_(entries, drift, alpha=-step_size / 2)
    torch._foreach_add_(entries, noise, alpha=math.sqrt(step_size))


def chain_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed derived from ``seed`` and labels (e.g. component name, chain index), so
    that a component's chains do not depend on which other components run beside it."""
    digest = hashlib.sha256(repr((seed, *labels)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A private generator on ``device`` (never the global RNG)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class RestrictedChain:
    """One SGLD chain over the entries of one component of a shared model snapshot.

    Several chains (components) may live on the same snapshot: the chain's current values
    are kept apart in ``state`` and written into the parameters only between ``load()``
    and ``unload()``, which restores the checkpoint's values bit for bit. Entries outside
    the component are never written.
    """

    def __init__(self, component: ResolvedComponent, params: dict[str, nn.Parameter],
                 generator: torch.Generator) -> None:
        self.name = component.name
        self.names = list(component.entries)
        self.params = [params[name] for name in self.names]
        self.indices = [None if index is None else index.to(params[name].device)
                        for name, index in component.entries.items()]
        self.anchors = [self._read(p, i).clone() for p, i in zip(self.params, self.indices)]
        self.state = [anchor.clone() for anchor in self.anchors]
        self.size = sum(anchor.numel() for anchor in self.anchors)
        self.generator = generator

    def mean_squared_displacement(self) -> torch.Tensor:
        """``|u - u*|^2 / d`` over the chain's ``d`` entries, float64 (a 0-dim tensor on the
        chain's device: no host synchronisation)."""
        total = sum(((value.double() - anchor.double()) ** 2).sum()
                    for value, anchor in zip(self.state, self.anchors))
        return total / self.size

    @staticmethod
    def _read(param: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        flat = param.detach().reshape(-1)
        return flat if index is None else flat[index]

    @staticmethod
    def _scatter(target: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> None:
        flat = target.view(-1)
        if index is None:
            flat.copy_(values)
        else:
            flat[index] = values

    def _write(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, index, value in zip(self.params, self.indices, values):
                self._scatter(param, index, value)

    def write_into(self, name: str, target: torch.Tensor) -> None:
        """Write the chain's current values of parameter ``name`` into ``target`` (a tensor
        of the parameter's shape holding w*)."""
        position = self.names.index(name)
        self._scatter(target, self.indices[position], self.state[position])

    def load(self) -> None:
        """Write the chain's current values into the model and make them trainable."""
        self._write(self.state)
        for param in self.params:
            param.requires_grad_(True)

    def unload(self) -> None:
        """Restore the checkpoint's values and freeze the parameters again."""
        for param in self.params:
            param.requires_grad_(False)
        self._write(self.anchors)

    def step(self, grads: Sequence[torch.Tensor], *, step_size: float, n_beta: float,
             gamma: float) -> None:
        """Apply one SGLD update from full-tensor gradients of the loaded parameters."""
        restricted = [self._read(g, i) for g, i in zip(grads, self.indices)]
        sgld_update(self.state, restricted, self.anchors, step_size=step_size, n_beta=n_beta,
                    gamma=gamma, generator=self.generator)


def restricted_chains(components: Sequence[ResolvedComponent], params: dict[str, nn.Parameter],
                      seed: int, chain_index: int, device: torch.device
                      ) -> list[RestrictedChain]:
    """Chain ``chain_index`` of every component, each with its own noise generator seeded
    by ``(seed, "noise", name, chain_index)``: a chain's draws do not depend on which other
    components run beside it."""
    return [RestrictedChain(c, params, make_generator(
        device, chain_seed(seed, "noise", c.name, chain_index))) for c in components]
