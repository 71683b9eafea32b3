"""Built-in component layouts of common Hugging Face causal LMs.

Per attention head ``l{layer}h{head}``:

- **GPT-2** (fused ``c_attn`` Conv1D, weight ``(d, 3*H*hd)`` = Q|K|V side by side): the
  head's ``hd`` columns of each of Q, K and V in ``c_attn.weight`` and ``c_attn.bias``, and
  its ``hd`` rows of ``c_proj.weight``.
- **GPT-NeoX** (fused ``query_key_value`` Linear, rows interleaved per head as
  ``[q_h | k_h | v_h]``): the head's ``3*hd`` rows of the weight and bias, and its ``hd``
  columns of ``dense.weight``.
- **Llama / Mistral / Qwen2** (separate ``q/k/v/o_proj``): the head's ``hd`` rows of
  ``q_proj`` (and bias), its ``hd`` columns of ``o_proj``, and the ``hd`` rows of
  ``k_proj``/``v_proj`` (and biases) of its key/value group. With grouped-query attention
  (``num_key_value_heads < num_attention_heads``) the ``H / KVH`` heads of one group read
  the *same* K/V rows, so those heads share entries: they are marked ``allow_overlap``.
  Pass ``include_shared_kv=False`` to give each head only its own Q and O slices.

The output-projection bias is shared by all heads of a layer and belongs to no head (it is
part of the layer's attention component). The head size is read from the attention
module itself (``head_dim``/``head_size``), so configs whose ``head_dim`` differs from
``hidden_size / num_heads`` are handled.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

from susc_callback.components.component import Component, canonical_parameter_names

HeadSlices = dict[str, tuple[int, list[slice]]]
"""{parameter name relative to the attention module: (dimension, slices along it)}."""

PRESETS = ("heads", "attention", "mlp", "layers", "embedding", "unembedding")


@dataclass(frozen=True)
class Architecture:
    """Where the parts of a causal LM live, as module paths."""

    blocks: str
    attention: str
    mlp: str
    embedding: tuple[str, ...]
    unembedding: tuple[str, ...]
    num_heads: Callable[[nn.Module], int]
    head_slices: Callable[[nn.Module, int, int], HeadSlices]
    """(attention module, num heads, head) -> {relative parameter name: (dim, slices)}."""
    grouped_kv: bool = False
    """Separate K/V projections that grouped-query attention may share between heads."""


def _head_dim(attention: nn.Module) -> int:
    for attr in ("head_dim", "head_size"):
        if hasattr(attention, attr):
            return int(getattr(attention, attr))
    raise ValueError(f"Cannot find the head size on {type(attention).__name__}")


def _gpt2_heads(attention: nn.Module, num_heads: int, head: int) -> HeadSlices:
    hd = _head_dim(attention)
    width = num_heads * hd
    own = slice(head * hd, (head + 1) * hd)
    qkv = [slice(part * width + head * hd, part * width + (head + 1) * hd) for part in range(3)]
    return {"c_attn.weight": (1, qkv), "c_attn.bias": (0, qkv), "c_proj.weight": (0, [own])}


def _neox_heads(attention: nn.Module, num_heads: int, head: int) -> HeadSlices:
    hd = _head_dim(attention)
    fused = [slice(head * 3 * hd, (head + 1) * 3 * hd)]
    own = [slice(head * hd, (head + 1) * hd)]
    return {"query_key_value.weight": (0, fused), "query_key_value.bias": (0, fused),
            "dense.weight": (1, own)}


def _llama_heads(attention: nn.Module, num_heads: int, head: int) -> HeadSlices:
    hd = _head_dim(attention)
    own = [slice(head * hd, (head + 1) * hd)]
    group = _llama_kv_group(attention, num_heads, head)
    kv = [slice(group * hd, (group + 1) * hd)]
    return {"q_proj.weight": (0, own), "q_proj.bias": (0, own),
            "k_proj.weight": (0, kv), "k_proj.bias": (0, kv),
            "v_proj.weight": (0, kv), "v_proj.bias": (0, kv),
            "o_proj.weight": (1, own)}


def _llama_kv_group(attention: nn.Module, num_heads: int, head: int) -> int:
    num_kv = attention.k_proj.out_features // _head_dim(attention)
    return head // (num_heads // num_kv)


def _config_heads(*names: str) -> Callable[[nn.Module], int]:
    def read(model: nn.Module) -> int:
        for name in names:
            if getattr(model.config, name, None):
                return int(getattr(model.config, name))
        raise ValueError(f"config has none of {names}")
    return read


_LLAMA_LIKE = Architecture(
    blocks="model.layers", attention="self_attn", mlp="mlp",
    embedding=("model.embed_tokens",), unembedding=("model.norm", "lm_head"),
    num_heads=_config_heads("num_attention_heads"), head_slices=_llama_heads,
    grouped_kv=True)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        blocks="transformer.h", attention="attn", mlp="mlp",
        embedding=("transformer.wte", "transformer.wpe"),
        unembedding=("transformer.ln_f", "lm_head"),
        num_heads=_config_heads("n_head", "num_attention_heads"), head_slices=_gpt2_heads),
    "gpt_neox": Architecture(
        blocks="gpt_neox.layers", attention="attention", mlp="mlp",
        embedding=("gpt_neox.embed_in",),
        # The output head is ``embed_out`` before transformers 5 and ``lm_head`` from 5 on;
        # missing paths are skipped, so listing both keeps "unembed" complete on either.
        unembedding=("gpt_neox.final_layer_norm", "embed_out", "lm_head"),
        num_heads=_config_heads("num_attention_heads"), head_slices=_neox_heads),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def architecture_of(model: nn.Module) -> Architecture:
    """The built-in layout of ``model``; a clear error for unsupported models."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is not None and not _has_module(model, arch.blocks):
        raise ValueError(
            f"{type(model).__name__} (model_type {model_type!r}) has no {arch.blocks!r}: "
            "the built-in layouts are for the causal-LM classes (e.g. GPT2LMHeadModel, "
            "LlamaForCausalLM), not bare base models. Load the causal LM, or pass components "
            "by hand (see docs/components.md).")
    if arch is None:
        found = f"model_type {model_type!r}" if model_type else type(model).__name__
        raise ValueError(
            f"No built-in component layout for {found} (supported causal LMs: "
            f"{', '.join(sorted(ARCHITECTURES))}). Pass components by hand, e.g. "
            "components={'my_part': {'layer.weight': bool_mask_or_None}} "
            "(see docs/components.md).")
    return arch


def head_components(model: nn.Module, *, include_shared_kv: bool = True,
                    layers: Collection[int] | None = None) -> list[Component]:
    """One component per attention head, named ``l{layer}h{head}`` (see module docstring);
    only the heads of ``layers`` when given (each head's masks are the size of its
    layer's attention weights, so a few heads should not cost all of them)."""
    arch = architecture_of(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    num_heads = arch.num_heads(model)
    components = []
    for layer, block in enumerate(_module(model, arch.blocks)):
        if layers is not None and layer not in layers:
            continue
        attention = _module(block, arch.attention)
        prefix = f"{arch.blocks}.{layer}.{arch.attention}."
        grouped = arch.grouped_kv and _is_grouped(attention, num_heads)
        for head in range(num_heads):
            masks = {}
            for rel_name, (dim, slices) in arch.head_slices(attention, num_heads, head).items():
                name = prefix + rel_name
                if name not in params:  # e.g. no bias in this config
                    continue
                if grouped and not include_shared_kv and rel_name.split(".")[0] in (
                        "k_proj", "v_proj"):
                    continue
                masks[name] = _slice_mask(params[name].shape, dim, slices)
            components.append(Component(f"l{layer}h{head}", masks,
                                        allow_overlap=grouped and include_shared_kv))
    return components


def head_names(model: nn.Module) -> list[str]:
    """The names :func:`head_components` gives, without building any mask."""
    arch = architecture_of(model)
    return [f"l{layer}h{head}" for layer in range(len(_module(model, arch.blocks)))
            for head in range(arch.num_heads(model))]


def layer_components(model: nn.Module, part: str) -> list[Component]:
    """Coarse components: ``part`` is "attention" (``l{i}.attn``), "mlp" (``l{i}.mlp``),
    "layers" (``l{i}``), "embedding" (``embed``) or "unembedding" (``unembed``)."""
    arch = architecture_of(model)
    blocks = _module(model, arch.blocks)
    if part in ("attention", "mlp", "layers"):
        suffix = {"attention": f".{arch.attention}", "mlp": f".{arch.mlp}", "layers": ""}[part]
        label = {"attention": ".attn", "mlp": ".mlp", "layers": ""}[part]
        return [Component(f"l{i}{label}", _all_parameters(model, f"{arch.blocks}.{i}{suffix}"))
                for i in range(len(blocks))]
    if part in ("embedding", "unembedding"):
        paths = arch.embedding if part == "embedding" else arch.unembedding
        masks = {name: None for path in paths if _has_module(model, path)
                 for name in _all_parameters(model, path)}
        tied = _tied_between(model, arch)
        return [Component("embed" if part == "embedding" else "unembed", masks,
                          allow_overlap=tied)]
    raise ValueError(f"Unknown component preset {part!r}; valid: {', '.join(PRESETS)}")


def preset_components(model: nn.Module, preset: str) -> list[Component]:
    """Components of a named preset (see :data:`PRESETS`)."""
    if preset == "heads":
        return head_components(model)
    return layer_components(model, preset)


def block_list_path(model: nn.Module) -> str | None:
    """Path of the model's list of transformer blocks, or None if unknown."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is not None and _has_module(model, arch.blocks):
        return arch.blocks
    return None


def _tied_between(model: nn.Module, arch: Architecture) -> bool:
    embed = {id(p) for path in arch.embedding if _has_module(model, path)
             for p in _module(model, path).parameters()}
    unembed = {id(p) for path in arch.unembedding if _has_module(model, path)
               for p in _module(model, path).parameters()}
    return bool(embed & unembed)


def _is_grouped(attention: nn.Module, num_heads: int) -> bool:
    return attention.k_proj.out_features // _head_dim(attention) < num_heads


def _slice_mask(shape: torch.Size, dim: int, slices: list[slice]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for part in slices:
        index = [slice(None)] * len(shape)
        index[dim] = part
        mask[tuple(index)] = True
    return mask


def _all_parameters(model: nn.Module, path: str) -> dict[str, None]:
    canonical = canonical_parameter_names(model)
    module = _module(model, path)
    return {canonical[f"{path}.{name}"]: None
            for name, _ in module.named_parameters(remove_duplicate=False)}


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def layer_of(name: str) -> str:
    """The group a component is compared with: for the preset names its layer's heads
    (``l3h5`` -> ``l3h``) or its own block part (``l3mlp``, ``l3``); components with other
    names form one group together."""
    match = re.match(r"^l(\d+)(h)?\d*", name)
    if match is None:
        return ""
    return f"l{match.group(1)}{'h' if match.group(2) else name[match.end():]}"


def group_by_layer(names: list[str]) -> dict[str, list[int]]:
    """``{layer: indices into names}`` in order of first appearance (:func:`layer_of`)."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(layer_of(name), []).append(index)
    return groups
