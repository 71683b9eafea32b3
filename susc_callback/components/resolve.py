"""From what the user asks for to components checked against a model.

A component specification (``None``, preset or component names, :class:`Component`
objects or a mapping of masks) becomes a list of :class:`Component`
(:func:`as_components`), and that a list of :class:`ResolvedComponent` with canonical
parameter names and flat indices, every problem named (:func:`resolve_components`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from susc_callback.components.architectures import (
    PRESETS,
    head_components,
    head_names,
    preset_components,
)
from susc_callback.components.component import (
    Component,
    ResolvedComponent,
    canonical_parameter_names,
)

HEAD_NAME = re.compile(r"l(\d+)h\d+")  # a head_components name


def as_components(model: nn.Module, spec: object = None) -> list[Component]:
    """Turn any accepted component specification into a list of :class:`Component`.

    Accepted: ``None`` (every attention head); a string of comma-separated parts, each a
    preset (``"heads"``, ``"attention"``, ``"mlp"``, ``"layers"``, ``"embedding"``,
    ``"unembedding"``) or the name of one of their components (``"l0h3"``, ``"l1.mlp"``);
    a :class:`Component`; a sequence mixing Components and such strings; or a mapping
    ``{name: {parameter name: mask or None}}``.
    """
    if spec is None:
        return preset_components(model, "heads")
    if isinstance(spec, str):
        parts = [part.strip() for part in spec.split(",") if part.strip()]
        if not parts:
            raise ValueError(f"Empty component string {spec!r}; valid presets: "
                             f"{', '.join(PRESETS)}, or names of their components")
        return _named_components(model, parts)
    if isinstance(spec, Component):
        return [spec]
    if isinstance(spec, Mapping):
        components = []
        for name, masks in spec.items():
            if not isinstance(masks, Mapping):
                raise TypeError(f"Component {name!r}: expected {{parameter name: mask or None}}, "
                                f"got {type(masks).__name__}")
            components.append(Component(str(name), dict(masks)))
        return components
    if isinstance(spec, Sequence) and all(isinstance(c, (Component, str)) for c in spec):
        return [found for item in spec for found in as_components(model, item)]
    raise TypeError(f"Cannot interpret components of type {type(spec).__name__}: pass None, a "
                    "preset or component name, a Component, a list of those or "
                    "{name: {parameter name: mask or None}}")


def _named_components(model: nn.Module, parts: list[str]) -> list[Component]:
    """The components of each part: a preset's, or the one preset component so named."""
    found: list[Component] = []
    for part in parts:
        found += preset_components(model, part) if part in PRESETS else \
            [_preset_component(model, part)]
    return found


def _preset_component(model: nn.Module, name: str) -> Component:
    """The component of some preset called ``name``. Only the named head's layer is built:
    a head's masks are the size of its layer's attention weights."""
    heads = _where_supported(head_names, model)
    if name in heads:
        layer = int(HEAD_NAME.fullmatch(name)[1])
        return next(c for c in head_components(model, layers={layer}) if c.name == name)
    coarse = {component.name: component for preset in PRESETS if preset != "heads"
              for component in _where_supported(preset_components, model, preset)}
    if name in coarse:
        return coarse[name]
    known = [*heads, *coarse]
    close = difflib.get_close_matches(name, [*PRESETS, *known], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    names = (f", or a name of one of their components ({', '.join(known[:4])}, ...)" if known
             else " (none applies to this model: pass components by hand)")
    raise ValueError(f"Unknown component {name!r}{hint}. Valid: the presets "
                     f"{', '.join(PRESETS)}{names}")


def _where_supported(build: Callable[..., list], *args: object) -> list:
    """``build(*args)``, or nothing where the model's architecture has no such preset (the
    presets raise ``ValueError`` for architectures they do not know)."""
    try:
        return build(*args)
    except ValueError:
        return []


def resolve_components(model: nn.Module, spec: object = None, *, allow_none: bool = False
                       ) -> list[ResolvedComponent]:
    """Validate components against ``model``; raise ``ValueError`` naming what is wrong.

    Checks: unique names, known parameter names (aliases of tied parameters are mapped to
    the canonical name), boolean masks of the parameter's shape, no empty component, and no
    overlap between components unless both set ``allow_overlap``. An empty list is refused
    unless ``allow_none`` (an estimate of the full chain alone).
    """
    components = [] if allow_none and isinstance(spec, (list, tuple)) and not spec else \
        as_components(model, spec)
    if not components and not allow_none:
        raise ValueError("No components to estimate: the component list is empty")
    canonical = canonical_parameter_names(model)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    resolved = []
    for component in components:
        if component.name in seen:
            raise ValueError(f"Duplicate component name {component.name!r}")
        if component.name == "full":
            raise ValueError("The component name 'full' is reserved for the full baseline chain")
        seen.add(component.name)
        resolved.append(_resolve_one(component, canonical, params))
    _check_overlaps(resolved, {name: p.numel() for name, p in params.items()})
    return resolved


def _resolve_one(component: Component, canonical: dict[str, str],
                 params: dict[str, nn.Parameter]) -> ResolvedComponent:
    if not component.masks:
        raise ValueError(f"Component {component.name!r} is empty: it names no parameters")
    entries: dict[str, torch.Tensor | None] = {}
    size = 0
    for raw_name, mask in component.masks.items():
        if raw_name not in canonical:
            close = difflib.get_close_matches(raw_name, list(canonical), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"Component {component.name!r}: unknown parameter {raw_name!r}{hint}")
        name = canonical[raw_name]
        param = params[name]
        if mask is None:
            index = None
            count = param.numel()
        else:
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool:
                raise ValueError(f"Component {component.name!r}: mask for {raw_name!r} has dtype "
                                 f"{mask.dtype}; masks must be torch.bool (or None for all)")
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f"Component {component.name!r}: mask for {raw_name!r} has shape "
                                 f"{tuple(mask.shape)}, the parameter has {tuple(param.shape)}")
            index = mask.reshape(-1).nonzero().squeeze(1).cpu()
            count = index.numel()
        if name in entries:  # the same tensor named twice through tied aliases
            index = _union(entries[name], index)
            count = param.numel() if index is None else index.numel()
            size -= param.numel() if entries[name] is None else entries[name].numel()
        entries[name] = index
        size += count
    if size == 0:
        raise ValueError(f"Component {component.name!r} is empty: its masks select no entries")
    return ResolvedComponent(component.name, entries, size, component.allow_overlap)


def _union(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return None
    return torch.unique(torch.cat([a, b]))


def _check_overlaps(components: list[ResolvedComponent], numels: dict[str, int]) -> None:
    by_param: dict[str, list[ResolvedComponent]] = {}
    for component in components:
        for name in component.entries:
            by_param.setdefault(name, []).append(component)
    for name, owners in by_param.items():
        if len(owners) < 2:
            continue
        owner_of = torch.full((numels[name],), -1, dtype=torch.long)
        for position, owner in enumerate(owners):
            index = owner.entries[name]
            index = torch.arange(numels[name]) if index is None else index
            previous = owner_of[index]
            for other_position in previous[previous >= 0].unique().tolist():
                other = owners[other_position]
                if not (owner.allow_overlap and other.allow_overlap):
                    raise ValueError(
                        f"Components {other.name!r} and {owner.name!r} overlap on parameter "
                        f"{name!r}. Give disjoint masks, or set allow_overlap=True on both "
                        "if the sharing is intended (e.g. tied weights, grouped-query K/V).")
            owner_of[index] = position
