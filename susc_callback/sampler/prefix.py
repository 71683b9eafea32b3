"""Frozen-prefix reuse: run a model from block ``k`` on, with blocks ``0..k-1`` replayed.

While a component of block ``k`` is sampled, the embeddings and blocks below it are frozen
at ``w*``, so their output on a given batch is the same at every SGLD step and every draw.
:class:`PrefixReplay` computes that output once (``capture``) and then makes blocks
``0..k-1`` return it instead of recomputing (``replay``). It patches only the private
float32 snapshot the engine samples on, never the caller's model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from susc_callback.sampler.patching import patched_forward


class _PrefixDone(Exception):
    """Raised from a hook to stop a forward pass once the prefix output is known."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


class PrefixReplay:
    """Capture and replay the output of a model's first ``k`` blocks."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList | None) -> None:
        self.model = model
        self.blocks = list(blocks) if blocks is not None else []

    def frozen_blocks(self, run_forward: Callable[[], object]) -> dict[str, int]:
        """For every parameter name, how many blocks run before it is first used.

        Found by running the model once with hooks on every parameter-owning module; a
        component can reuse the output of ``min(frozen_blocks[p] for p in component)``
        blocks. Without a block list every parameter gets 0 (no reuse).
        """
        owners: dict[nn.Module, list[str]] = {}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for param_name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                owners.setdefault(module, []).append(full_name)
        if not self.blocks:
            return {name: 0 for names in owners.values() for name in names}
        completed = [0]
        first_use: dict[str, int] = {}
        handles = []

        def on_call(module: nn.Module, *_: object) -> None:
            for name in owners[module]:
                first_use.setdefault(name, completed[0])

        def on_block_done(*_: object) -> None:
            completed[0] += 1

        try:
            for module in owners:
                handles.append(module.register_forward_pre_hook(on_call))
            for block in self.blocks:
                handles.append(block.register_forward_hook(on_block_done))
            with torch.no_grad():
                run_forward()
        finally:
            for handle in handles:
                handle.remove()
        # A parameter whose module never ran may still be used functionally: replay nothing.
        return {name: first_use.get(name, 0) for names in owners.values() for name in names}

    def capture(self, num_blocks: int, run_forward: Callable[[], object]) -> torch.Tensor | None:
        """Output of block ``num_blocks - 1`` when ``run_forward()`` runs (no grad)."""
        if num_blocks == 0:
            return None

        def stop(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
            raise _PrefixDone(output)

        handle = self.blocks[num_blocks - 1].register_forward_hook(stop)
        try:
            with torch.no_grad():
                run_forward()
        except _PrefixDone as done:
            return done.output
        finally:
            handle.remove()
        raise RuntimeError(f"Block {num_blocks - 1} did not run during the forward pass")

    def replay(self, num_blocks: int, output: torch.Tensor | None
               ) -> AbstractContextManager[None]:
        """Within the context, blocks ``0..num_blocks-1`` return ``output`` uncomputed."""
        return patched_forward({block: _constant(output) for block in self.blocks[:num_blocks]})


def _constant(output: torch.Tensor) -> Callable[..., torch.Tensor]:
    def forward(*_args: object, **_kwargs: object) -> torch.Tensor:
        return output
    return forward
