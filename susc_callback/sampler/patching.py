"""Instance-level ``forward`` overrides on the private snapshot, always undone.

Prefix replay and chain stacking both make some modules of the snapshot compute something
else for the length of one call. They set ``module.forward`` on the instance and put back
exactly what was there before: nothing, or an instance-level wrapper of the caller's own
(as accelerate's hooks are), which must survive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def patched_forward(forwards: dict[nn.Module, Callable]) -> Iterator[None]:
    """Within the context, ``module(...)`` runs ``forwards[module]`` for every module."""
    saved = {module: module.__dict__.get("forward") for module in forwards}
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, previous in saved.items():
            if previous is None:
                del module.forward
            else:
                module.forward = previous
