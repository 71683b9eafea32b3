"""Weight-restricted SGLD: the update rule, and the chains of one component as one bank."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from susc_callback.components.component import ResolvedComponent

NOISE_BLOCK_STEPS = 256    # steps of noise a chain's generator draws at once, at most
NOISE_BLOCK_FLOATS = 2**16  # and at most this many numbers per chain (a block's memory)


def noise_block_steps(size: int) -> int:
    """Steps per noise block of a chain of ``size`` entries: set by the size alone, so a
    chain's noise does not depend on how many chains it is batched with."""
    return max(1, min(NOISE_BLOCK_STEPS, NOISE_BLOCK_FLOATS // max(size, 1)))


def sgld_update(entries: torch.Tensor, grads: torch.Tensor, anchor: torch.Tensor,
                noise: torch.Tensor, *, step_size: float, n_beta: float, gamma: float) -> None:
    """One SGLD step, in place, on ``(chains, d)`` entries of one component::

        u <- u - (step_size / 2) * (n_beta * grad + gamma * (u - anchor))
               + sqrt(step_size) * noise

    ``grads`` = dL/du of each chain's mean minibatch loss, ``anchor`` = u* (d,), the
    checkpoint's values, ``noise`` standard normal. Five kernels for any number of chains.
    """
    drift = grads * n_beta
    drift.add_(entries - anchor, alpha=gamma)
    entries.add_(drift, alpha=-step_size / 2)
    entries.add_(noise, alpha=math.sqrt(step_size))


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


class ChainBank:
    """The chains ``chains`` of one component over a shared model snapshot, as one
    ``(len(chains), d)`` tensor of the component's entries (its parameters' flat indices,
    concatenated in order).

    The snapshot keeps the checkpoint's values: a chain's values are written into its
    parameters only between ``load(j)`` and ``unload()`` (which restores them bit for bit),
    or into stacked copies of them (:meth:`write_into`). Entries outside the component are
    never written. Each chain draws its noise from its own generator, seeded by ``(seed,
    "noise", name, chain)``, in blocks of :func:`noise_block_steps` steps.
    """

    def __init__(self, component: ResolvedComponent, params: dict[str, nn.Parameter],
                 seed: int, chains: Sequence[int], device: torch.device) -> None:
        self.name, self.chains = component.name, list(chains)
        self.chain_index = torch.tensor(self.chains, dtype=torch.long, device=device)
        self.names = list(component.entries)
        self.params = [params[name] for name in self.names]
        self.indices = [None if index is None else index.to(params[name].device)
                        for name, index in component.entries.items()]
        anchors = [self._read(p, i) for p, i in zip(self.params, self.indices)]
        self.sizes = [len(anchor) for anchor in anchors]
        self.anchor = torch.cat(anchors)  # a copy: never a view of the snapshot
        self.state = self.anchor.repeat(len(self.chains), 1)
        self.size = len(self.anchor)
        self.generators = [make_generator(device, chain_seed(seed, "noise", self.name, c))
                           for c in self.chains]
        self.block = noise_block_steps(self.size)
        self._noise = torch.empty((len(self.chains), self.block, self.size), device=device)
        self._next = self.block

    @property
    def count(self) -> int:
        return len(self.chains)

    def noise(self) -> torch.Tensor:
        """The next step's standard normal noise, ``(chains, d)``."""
        if self._next == self.block:
            for j, generator in enumerate(self.generators):
                torch.randn((self.block, self.size), generator=generator, out=self._noise[j])
            self._next = 0
        self._next += 1
        return self._noise[:, self._next - 1]

    def step(self, grads: torch.Tensor, *, step_size: float, n_beta: float,
             gamma: float) -> None:
        """One SGLD update of every chain from its ``(chains, d)`` gradient."""
        sgld_update(self.state, grads, self.anchor, self.noise(), step_size=step_size,
                    n_beta=n_beta, gamma=gamma)

    def parts(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``values`` ``(chains, d)`` split per parameter: ``(chains, d_p)`` each."""
        return list(values.split(self.sizes, dim=1))

    def gather(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(chains, d)``: the component's entries of per-chain full-tensor gradients
        (``grads[p]`` of shape ``(chains, *param.shape)``, in the order of ``names``)."""
        return torch.cat([g.reshape(len(g), -1) if i is None else
                          g.reshape(len(g), -1).index_select(1, i)
                          for g, i in zip(grads, self.indices)], dim=1)

    def mean_squared_displacement(self) -> torch.Tensor:
        """``|u - u*|^2 / d`` of every chain, ``(chains,)`` float64 (on the device: no
        host synchronisation)."""
        return ((self.state.double() - self.anchor.double()) ** 2).sum(1) / self.size

    def write_into(self, name: str, target: torch.Tensor) -> None:
        """Write every chain's values of parameter ``name`` into ``target``, a
        ``(chains, *shape)`` tensor holding w*."""
        position = self.names.index(name)
        values = self.parts(self.state)[position]
        flat, index = target.view(len(target), -1), self.indices[position]
        if index is None:
            flat.copy_(values)
        else:
            flat[:, index] = values

    def load(self, j: int) -> None:
        """Write chain ``j``'s values into the snapshot and make them trainable."""
        self._write(self.parts(self.state[j:j + 1]))
        for param in self.params:
            param.requires_grad_(True)

    def unload(self) -> None:
        """Restore the checkpoint's values and freeze the parameters again."""
        for param in self.params:
            param.requires_grad_(False)
        self._write(self.parts(self.anchor[None]))

    def _write(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, index, value in zip(self.params, self.indices, values):
                flat = param.view(-1)
                if index is None:
                    flat.copy_(value[0])
                else:
                    flat[index] = value[0]

    @staticmethod
    def _read(param: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        flat = param.detach().reshape(-1)
        return flat if index is None else flat[index]


def chain_banks(components: Sequence[ResolvedComponent], params: dict[str, nn.Parameter],
                seed: int, chains: Sequence[int], device: torch.device) -> list[ChainBank]:
    """The chains ``chains`` of every component, one bank per component."""
    return [ChainBank(c, params, seed, chains, device) for c in components]
