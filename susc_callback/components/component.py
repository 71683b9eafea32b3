"""Components: named sets of parameter entries, and their validation against a model.

A component maps parameter names to a boolean mask of the parameter's shape (the entries
that belong to the component) or to ``None`` (the whole tensor). Everything outside a
component stays frozen at ``w*`` while that component's chains run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

Masks = Mapping[str, "torch.Tensor | None"]


@dataclass(frozen=True)
class Component:
    """A named set of parameter entries.

    Attributes:
        name: unique label, e.g. ``"l1h3"``.
        masks: ``{parameter name: bool mask of the parameter's shape, or None for all}``.
        allow_overlap: this component knowingly shares entries with other components that
            also allow it (a grouped-query head and its KV group, tied embeddings). Any other
            overlap is reported as an error.
    """

    name: str
    masks: Masks
    allow_overlap: bool = False


@dataclass(frozen=True)
class ResolvedComponent:
    """A component checked against a model: canonical parameter names and flat indices."""

    name: str
    entries: dict[str, torch.Tensor | None] = field(repr=False)
    """Canonical parameter name -> flat long indices of the entries (None = all)."""
    size: int
    allow_overlap: bool


def canonical_parameter_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name, tied aliases included, mapped to its ``named_parameters`` name."""
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters():
        first_name.setdefault(id(param), name)
    return {name: first_name[id(param)]
            for name, param in model.named_parameters(remove_duplicate=False)}
