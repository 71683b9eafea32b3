"""Everything about an estimate's inputs that can be checked before sampling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from susc_callback.components.component import ResolvedComponent
from susc_callback.components.resolve import resolve_components
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.data.sampling import SamplingData


def check_inputs(model: nn.Module, components: Any, sampling_data: Any, probe: ProbeSet,
                 config: SGLDConfig, *, collate_fn: Callable | None = None
                 ) -> tuple[list[ResolvedComponent], SamplingData]:
    """Everything that can be checked without sampling; raises a clear ``ValueError`` or
    ``TypeError``. Returns the resolved components and the sampling data."""
    if not isinstance(probe, ProbeSet):
        raise TypeError(f"probe must be a ProbeSet, got {type(probe).__name__}")
    if not isinstance(config, SGLDConfig):
        raise TypeError(f"config must be an SGLDConfig, got {type(config).__name__}")
    resolved = resolve_components(model, components)
    data = sampling_data if isinstance(sampling_data, SamplingData) else SamplingData(
        sampling_data, collate_fn)
    check_data_size(len(data), config)
    cpu = torch.device("cpu")
    check_fits_model(model, probe.batch(0, len(probe), cpu), "probe")
    ids = data.column("input_ids")
    sample = {"input_ids": ids} if ids is not None else data.batch(
        torch.arange(config.batch_size), cpu)
    if not isinstance(sample, dict):
        raise TypeError(f"sampling_data batches must be dicts of tensors, got "
                        f"{type(sample).__name__}; pass a collate_fn that returns one")
    check_fits_model(model, sample, "sampling_data")
    return resolved, data


def check_data_size(size: int, config: SGLDConfig) -> None:
    """Enough sampling sequences for a minibatch and the observable (and anchor) sets."""
    needed = {"batch_size": config.batch_size}
    if config.observable == "fixed" or config.anchor == "separate-batches":
        needed["observable_sequences"] = config.observable_sequences
    if config.anchor == "separate-batches":
        needed["2 * observable_sequences (separate anchor set)"] = 2 * config.observable_sequences
    for what, count in needed.items():
        if size < count:
            raise ValueError(f"sampling_data has {size} sequences, fewer than {what} = {count}")


def check_fits_model(model: nn.Module, batch: dict, what: str) -> None:
    """Token ids within the vocabulary and sequences within the context of a HF model."""
    config, ids = getattr(model, "config", None), batch.get("input_ids")
    if config is None or not isinstance(ids, torch.Tensor) or ids.numel() == 0:
        return
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"{what} holds token ids in [{int(ids.min())}, {int(ids.max())}], "
                         f"outside the model's vocabulary [0, {vocab - 1}]")
    context = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None)
    if context is not None and ids.shape[-1] > context:
        raise ValueError(f"{what} sequences have {ids.shape[-1]} tokens, more than the model's "
                         f"context of {context}; truncate them (e.g. max_length={context})")
