"""Everything about an estimate's inputs that can be checked before sampling."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from susc_callback.components.component import ResolvedComponent
from susc_callback.components.resolve import resolve_components
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.data.sampling import LossFn, SamplingData, causal_lm_valid_targets


def check_inputs(model: nn.Module, components: Any, sampling_data: Any, probe: ProbeSet,
                 config: SGLDConfig, *, loss_fn: LossFn | None = None,
                 collate_fn: Callable | None = None, allow_no_components: bool = False
                 ) -> tuple[list[ResolvedComponent], SamplingData]:
    """Everything that can be checked without sampling; raises a clear ``ValueError`` or
    ``TypeError``. Returns the resolved components and the sampling data (an empty
    component list, the full chain alone, only with ``allow_no_components``)."""
    if not isinstance(probe, ProbeSet):
        raise TypeError(f"probe must be a ProbeSet, got {type(probe).__name__}")
    if not isinstance(config, SGLDConfig):
        raise TypeError(f"config must be an SGLDConfig, got {type(config).__name__}")
    check_parameters_hold_values(model)
    if loss_fn is None:
        check_default_loss_applies(model)
    resolved = resolve_components(model, components, allow_none=allow_no_components)
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
    if loss_fn is None:
        check_has_targets(data)
    return resolved, data


def check_parameters_hold_values(model: nn.Module) -> None:
    """Parameters on the ``meta`` device have a shape but no values: nothing to sample."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"{len(meta)} parameters of the model are on the 'meta' device (e.g. "
                         f"{meta[0]!r}) and hold no values; load the weights onto a real "
                         "device first (e.g. from_pretrained without device_map='meta', or "
                         "model.to_empty(device='cpu') followed by load_state_dict)")


def check_default_loss_applies(model: nn.Module) -> None:
    """The default loss is a causal LM's next-token cross-entropy: refuse models it cannot
    mean anything for, naming the fix (``loss_fn=``)."""
    from transformers import PreTrainedModel

    name = type(model).__name__
    if isinstance(model, PreTrainedModel):
        if not model.can_generate():
            raise ValueError(f"{name} is not a causal language model, but the default loss is "
                             "next-token cross-entropy; pass loss_fn=... (per-sample losses "
                             "of your model's objective, e.g. the masked-token loss)")
        return
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "input_ids" not in parameters and not takes_kwargs:
        raise ValueError(f"The default loss calls model(input_ids=..., attention_mask=..., "
                         f"position_ids=..., use_cache=False).logits, which {name}."
                         f"forward{inspect.signature(model.forward)} cannot take; pass "
                         "loss_fn=lambda model, batch: per-sample losses")


def check_has_targets(data: SamplingData) -> None:
    """Sampling data given as tensors have a target for the default loss somewhere; warns
    once when some sequences have none. (Examples collated on the fly are checked batch
    by batch as they are used: :class:`~susc_callback.sampler.group.GroupLosses`.)"""
    if data.column("input_ids") is None:
        return
    batch = {key: data.column(key) for key in ("input_ids", "attention_mask", "labels")
             if data.column(key) is not None}
    per_sequence = causal_lm_valid_targets(batch).sum(dim=1)
    if int(per_sequence.sum()) == 0:
        raise ValueError("sampling_data has no valid target token: every position is masked "
                         "(attention_mask 0 or labels -100) or the sequences are 1 token "
                         "long; the sampling loss, and so every susceptibility, would be "
                         "undefined")
    empty = int((per_sequence == 0).sum())
    if empty:
        warnings.warn(f"{empty} of {len(per_sequence)} sampling_data sequences have no valid "
                      "target token; they add nothing to the sampling loss", stacklevel=3)


def check_data_size(size: int, config: SGLDConfig) -> None:
    """Enough sampling sequences for a minibatch and the observable (and anchor) sets."""
    needed = {"batch_size": config.batch_size}
    if config.observable != "minibatch" or config.anchor == "separate-batches":
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
                         f"context of {context}; truncate them to {context} tokens "
                         f"(max_length={context} in ProbeSet.from_texts / from_jsonl, "
                         f"--max-length {context} in susc analyze)")


def check_finite_at_optimum(values: torch.Tensor, what: str) -> None:
    """Non-finite losses at ``w*`` itself: no step size can help, so fail before sampling."""
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"The {what} at the checkpoint w* are not finite ({bad} of "
                         f"{values.numel()} are NaN or inf) before any SGLD step: the "
                         "checkpoint's weights or the loss on these inputs are broken (or the "
                         "set has no valid token); sampling cannot define anything from it")
