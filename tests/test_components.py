"""Tests of components: per-head layouts, coarse presets and validation.

The decisive per-head test does not trust ``architectures.py``: it hooks each attention
module's output projection (``c_proj`` / ``dense`` / ``o_proj``), whose input is the
per-head attention output ``(batch, seq, heads * head_dim)`` before the heads are mixed,
perturbs the model's parameters only at the entries a head's masks select, and checks
which heads' outputs moved.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from susc_callback.components.architectures import head_components, layer_components
from susc_callback.components.component import Component, canonical_parameter_names
from susc_callback.components.resolve import resolve_components

LAYERS, HEADS, HIDDEN, VOCAB = 2, 4, 32, 61
EAGER = {"attn_implementation": "eager"}


def _finish(model: nn.Module, seed: int) -> nn.Module:
    """Eval mode, float64, and non-degenerate weights (HF init is tiny and zeroes biases)."""
    torch.manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def _gpt2(tie: bool = True) -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(
        n_layer=LAYERS, n_head=HEADS, n_embd=HIDDEN, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie, **EAGER))


def _neox() -> nn.Module:
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, hidden_size=HIDDEN,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16, **EAGER))


def _llama_like(config_cls, model_cls, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = dict(num_hidden_layers=LAYERS, num_attention_heads=HEADS, hidden_size=HIDDEN,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16)
        config.update(kwargs)
        return model_cls(config_cls(**config, **EAGER))
    return build


@dataclass(frozen=True)
class Case:
    """A tiny model and where its attention lives, written down independently of the
    package's own layout table."""

    id: str
    build: Callable[[], nn.Module]
    blocks: str
    attention: str  # attention module, relative to a block
    out_proj: str  # output projection, relative to the attention module
    head_dim: int
    kv_heads: int
    qkv_bias: bool

    def attn_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.attention}"

    def out_path(self, layer: int) -> str:
        return f"{self.attn_path(layer)}.{self.out_proj}"


HD = HIDDEN // HEADS
LLAMA = dict(blocks="model.layers", attention="self_attn", out_proj="o_proj")
CASES = [
    Case("gpt2", _gpt2, "transformer.h", "attn", "c_proj", HD, HEADS, True),
    Case("gpt_neox", _neox, "gpt_neox.layers", "attention", "dense", HD, HEADS, True),
    Case("llama", _llama_like(LlamaConfig, LlamaForCausalLM, num_key_value_heads=HEADS),
         head_dim=HD, kv_heads=HEADS, qkv_bias=False, **LLAMA),
    Case("mistral", _llama_like(MistralConfig, MistralForCausalLM, num_key_value_heads=HEADS),
         head_dim=HD, kv_heads=HEADS, qkv_bias=False, **LLAMA),
    Case("qwen2", _llama_like(Qwen2Config, Qwen2ForCausalLM, num_key_value_heads=HEADS),
         head_dim=HD, kv_heads=HEADS, qkv_bias=True, **LLAMA),
    # grouped-query attention: 4 query heads read 2 key/value heads
    Case("llama_gqa", _llama_like(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2),
         head_dim=HD, kv_heads=2, qkv_bias=False, **LLAMA),
    # head_dim (16) != hidden / heads (8), with biases on every projection (o_proj too)
    Case("llama_hd16_bias",
         _llama_like(LlamaConfig, LlamaForCausalLM, num_key_value_heads=HEADS, head_dim=16,
                     attention_bias=True),
         head_dim=16, kv_heads=HEADS, qkv_bias=True, **LLAMA),
    Case("mistral_gqa_hd16",
         _llama_like(MistralConfig, MistralForCausalLM, num_key_value_heads=2, head_dim=16),
         head_dim=16, kv_heads=2, qkv_bias=False, **LLAMA),
    # both at once, plus Qwen2's q/k/v biases
    Case("qwen2_gqa_hd16",
         _llama_like(Qwen2Config, Qwen2ForCausalLM, num_key_value_heads=2, head_dim=16),
         head_dim=16, kv_heads=2, qkv_bias=True, **LLAMA),
]
BASE_CASES = [c for c in CASES if c.id in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2")]
GQA_CASES = [c for c in CASES if c.kv_heads < HEADS]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def case_model(request):
    case = request.param
    model = _finish(case.build(), seed=CASES.index(case))
    torch.manual_seed(1234)
    input_ids = torch.randint(0, VOCAB, (2, 7))
    return case, model, input_ids


@pytest.fixture(scope="module", params=BASE_CASES, ids=lambda c: c.id)
def base_model(request):
    case = request.param
    return case, _finish(case.build(), seed=100 + CASES.index(case))


@pytest.fixture(scope="module", params=GQA_CASES, ids=lambda c: c.id)
def gqa_model(request):
    case = request.param
    return case, _finish(case.build(), seed=200 + CASES.index(case))


# ----------------------------------------------------------------------------- helpers


def _run(model, case: Case, input_ids, *, keep_heads: dict[int, set[int]] | None = None):
    """Forward pass; per layer, the output projection's input split into heads
    ``(batch, seq, heads, head_dim)`` and the projection's output. ``keep_heads`` zeroes,
    per layer, every head's pre-projection output except those listed."""
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for layer in range(LAYERS):
        proj = model.get_submodule(case.out_path(layer))

        def pre(module, args, layer=layer):
            z = args[0]
            assert z.shape[-1] == HEADS * case.head_dim
            if keep_heads is not None and layer in keep_heads:
                z = z.clone().unflatten(-1, (HEADS, case.head_dim))
                drop = [h for h in range(HEADS) if h not in keep_heads[layer]]
                z[..., drop, :] = 0
                z = z.flatten(-2)
            captured.setdefault(layer, {})["z"] = z.detach().clone()
            return (z, *args[1:])

        def post(module, args, output, layer=layer):
            captured[layer]["out"] = output.detach().clone()

        handles.append(proj.register_forward_pre_hook(pre))
        handles.append(proj.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (v["z"].unflatten(-1, (HEADS, case.head_dim)), v["out"])
            for layer, v in captured.items()}


def _perturbed(model, masks, *, seed: int = 0, scale: float = 0.5, invert_within=None):
    """A copy of ``model`` with Gaussian noise added at exactly the masked entries.

    With ``invert_within`` (a list of parameter names), the noise goes instead to every
    entry of those parameters that the masks do *not* select."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    generator = torch.Generator().manual_seed(seed)
    if invert_within is not None:
        selected = {}
        for name in invert_within:
            mask = masks.get(name)
            full = torch.ones_like(params[name], dtype=torch.bool)
            selected[name] = full if name not in masks else (
                torch.zeros_like(full) if mask is None else ~mask)
        masks = selected
    with torch.no_grad():
        for name, mask in masks.items():
            param = params[name]
            mask = torch.ones_like(param, dtype=torch.bool) if mask is None else mask
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.add_(scale * noise * mask)
    return model


def _layer_head(name: str) -> tuple[int, int]:
    match = re.fullmatch(r"l(\d+)h(\d+)", name)
    assert match, name
    return int(match[1]), int(match[2])


def _changed_heads(z0: torch.Tensor, z1: torch.Tensor) -> set[int]:
    """Heads whose output is not bitwise equal; a changed head must change clearly."""
    changed = set()
    for h in range(HEADS):
        if not torch.equal(z0[..., h, :], z1[..., h, :]):
            assert (z0[..., h, :] - z1[..., h, :]).abs().max() > 1e-6
            changed.add(h)
    return changed


def _attention_params(model, case: Case, layer: int) -> list[str]:
    prefix = case.attn_path(layer) + "."
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


def _input_side_params(model, case: Case, layer: int) -> list[str]:
    """The attention module's parameters that act before the output projection."""
    out_prefix = case.out_path(layer) + "."
    return [n for n in _attention_params(model, case, layer) if not n.startswith(out_prefix)]


def _group_of(case: Case, head: int) -> set[int]:
    size = HEADS // case.kv_heads
    first = (head // size) * size
    return set(range(first, first + size))


def _project_delta(proj: nn.Module, z: torch.Tensor, delta_weight: torch.Tensor):
    """Change of ``proj(z)`` when its weight changes by ``delta_weight`` (bias unchanged)."""
    if isinstance(proj, nn.Linear):  # weight (out, in)
        return F.linear(z, delta_weight)
    return z @ delta_weight  # HF Conv1D: weight (in, out)


# ------------------------------------------------------------------- per-head layouts


def test_head_names_and_mask_shapes(case_model):
    case, model, _ = case_model
    components = head_components(model)
    assert [c.name for c in components] == [
        f"l{layer}h{head}" for layer in range(LAYERS) for head in range(HEADS)]
    params = dict(model.named_parameters(remove_duplicate=False))
    for c in components:
        layer, _ = _layer_head(c.name)
        assert set(c.masks) <= set(_attention_params(model, case, layer)), c.name
        for name, mask in c.masks.items():
            assert mask is not None and mask.dtype == torch.bool
            assert mask.shape == params[name].shape, (c.name, name)
        assert c.allow_overlap == (case.kv_heads < HEADS)


def test_head_sizes_and_coverage(case_model):
    """Each head owns hd rows/columns of Q, K, V (+ biases) and O; together the heads of a
    layer cover every attention parameter entry except the output-projection bias."""
    case, model, _ = case_model
    resolved = {r.name: r for r in resolve_components(model)}
    hd = case.head_dim
    expected = 4 * hd * HIDDEN + (3 * hd if case.qkv_bias else 0)
    assert {r.size for r in resolved.values()} == {expected}
    params = dict(model.named_parameters())
    components = head_components(model)
    for layer in range(LAYERS):
        union = {n: torch.zeros_like(params[n], dtype=torch.bool)
                 for n in _attention_params(model, case, layer)}
        for c in components[layer * HEADS:(layer + 1) * HEADS]:
            for name, mask in c.masks.items():
                union[name] |= mask
        out_bias = case.out_path(layer) + ".bias"
        for name, covered in union.items():
            if name == out_bias:
                assert not covered.any(), "the output bias is shared by all heads"
            else:
                assert covered.all(), name


def test_perturbing_a_head_changes_only_that_head(case_model):
    """The issue's decisive test. Noise at exactly head h's entries (its Q/K/V slices and
    its O slice) changes head h's pre-projection output and leaves every other head's
    bitwise equal. Under grouped-query attention the default head owns its group's shared
    K/V rows, so exactly the heads of its group move; with include_shared_kv=False only h."""
    case, model, input_ids = case_model
    base = _run(model, case, input_ids)
    for include_shared_kv in (True, False):
        for c in head_components(model, include_shared_kv=include_shared_kv):
            layer, head = _layer_head(c.name)
            after = _run(_perturbed(model, c.masks, seed=layer * HEADS + head), case, input_ids)
            expected = {head}
            if include_shared_kv and case.kv_heads < HEADS:
                expected = _group_of(case, head)
            assert _changed_heads(base[layer][0], after[layer][0]) == expected, (
                c.name, include_shared_kv)
            for earlier in range(layer):  # nothing upstream moves either
                assert torch.equal(base[earlier][1], after[earlier][1])


def test_head_masks_hold_all_of_the_heads_inputs(case_model):
    """Completeness: noise on every other input-side attention entry (outside head h's
    masks) leaves head h's pre-projection output bitwise equal, and moves every other
    head. (Under GQA this needs the shared K/V rows, i.e. include_shared_kv=True.)"""
    case, model, input_ids = case_model
    base = _run(model, case, input_ids)
    for c in head_components(model):
        layer, head = _layer_head(c.name)
        others = _perturbed(model, c.masks, seed=7 + head,
                            invert_within=_input_side_params(model, case, layer))
        after = _run(others, case, input_ids)
        assert _changed_heads(base[layer][0], after[layer][0]) == set(range(HEADS)) - {head}


def test_output_slice_multiplies_only_its_head(case_model):
    """Noise on head h's O-slice entries only: the projection output changes by exactly
    (head h's pre-projection output) x (the weight change), computed from head h alone."""
    case, model, input_ids = case_model
    base = _run(model, case, input_ids)
    for c in head_components(model):
        layer, head = _layer_head(c.name)
        out_weight = case.out_path(layer) + ".weight"
        assert out_weight in c.masks
        perturbed = _perturbed(model, {out_weight: c.masks[out_weight]}, seed=head)
        after = _run(perturbed, case, input_ids)
        z, out0 = base[layer]
        assert torch.equal(z, after[layer][0])  # the O slice acts after the heads
        proj = model.get_submodule(case.out_path(layer))
        delta_w = perturbed.get_parameter(out_weight) - proj.weight
        z_h_only = torch.zeros_like(z)
        z_h_only[..., head, :] = z[..., head, :]
        predicted = _project_delta(proj, z_h_only.flatten(-2), delta_w)
        assert predicted.abs().max() > 1e-6
        torch.testing.assert_close(after[layer][1] - out0, predicted, rtol=1e-9, atol=1e-12)


def test_output_slice_with_heads_silenced(case_model):
    """With head h's pre-projection output zeroed, its O-slice entries are irrelevant
    (bitwise); with every head but h zeroed, all O entries outside h's slice are."""
    case, model, input_ids = case_model
    for c in head_components(model):
        layer, head = _layer_head(c.name)
        out_weight = case.out_path(layer) + ".weight"
        own = {out_weight: c.masks[out_weight]}

        silenced = {layer: set(range(HEADS)) - {head}}
        before = _run(model, case, input_ids, keep_heads=silenced)[layer][1]
        after = _run(_perturbed(model, own), case, input_ids, keep_heads=silenced)[layer][1]
        assert torch.equal(before, after), c.name

        alone = {layer: {head}}
        before = _run(model, case, input_ids, keep_heads=alone)[layer][1]
        others = _perturbed(model, own, invert_within=[out_weight])
        assert torch.equal(before, _run(others, case, input_ids, keep_heads=alone)[layer][1])
        moved = _run(_perturbed(model, own), case, input_ids, keep_heads=alone)[layer][1]
        assert not torch.equal(before, moved), c.name


def test_gqa_heads_share_their_groups_kv_rows(gqa_model):
    case, model = gqa_model
    shared = head_components(model)
    assert all(c.allow_overlap for c in shared)
    for layer in range(LAYERS):
        heads = shared[layer * HEADS:(layer + 1) * HEADS]
        prefix = case.attn_path(layer)
        for kv in ("k_proj", "v_proj"):
            name = f"{prefix}.{kv}.weight"
            for a in range(HEADS):
                for b in range(HEADS):
                    same = torch.equal(heads[a].masks[name], heads[b].masks[name])
                    disjoint = not (heads[a].masks[name] & heads[b].masks[name]).any()
                    if b in _group_of(case, a):
                        assert same
                    else:
                        assert disjoint
            # each group's rows are hd consecutive rows of the kv projection
            rows = heads[0].masks[name].all(dim=1).nonzero().squeeze(1)
            assert rows.tolist() == list(range(case.head_dim))
        for own in ("q_proj", "o_proj"):
            name = f"{prefix}.{own}.weight"
            total = sum(h.masks[name].long() for h in heads)
            assert total.max() == 1  # Q and O slices stay disjoint
    # the overlap is accepted because every head allows it
    assert len(resolve_components(model, shared)) == LAYERS * HEADS

    dropped = head_components(model, include_shared_kv=False)
    for c in dropped:
        assert not c.allow_overlap
        assert not any(".k_proj." in n or ".v_proj." in n for n in c.masks)
    resolved = resolve_components(model, dropped)  # disjoint: no allow_overlap needed
    assert {r.size for r in resolved} == {
        2 * case.head_dim * HIDDEN + (case.head_dim if case.qkv_bias else 0)}

    # one GQA head that does not allow overlap clashes with its group mates
    strict = [Component(c.name, c.masks, allow_overlap=(i != 0)) for i, c in enumerate(shared)]
    with pytest.raises(ValueError, match="'l0h0'.*overlap|overlap.*'l0h0'"):
        resolve_components(model, strict)


def test_mha_include_shared_kv_is_a_no_op(base_model):
    case, model = base_model
    a = head_components(model)
    b = head_components(model, include_shared_kv=False)
    assert [c.name for c in a] == [c.name for c in b]
    for x, y in zip(a, b):
        assert not x.allow_overlap and not y.allow_overlap
        assert x.masks.keys() == y.masks.keys()
        assert all(torch.equal(x.masks[n], y.masks[n]) for n in x.masks)


# ------------------------------------------------------------------ coarse components


def _under(model, path: str) -> set[str]:
    """Canonical names of the parameters under module ``path``."""
    canonical = canonical_parameter_names(model)
    module = model.get_submodule(path)
    return {canonical[f"{path}.{n}"] for n, _ in module.named_parameters(remove_duplicate=False)}


MLP = {"transformer.h": "mlp", "gpt_neox.layers": "mlp", "model.layers": "mlp"}


def test_layer_presets_names_and_params(base_model):
    case, model = base_model
    attention = layer_components(model, "attention")
    mlp = layer_components(model, "mlp")
    layers = layer_components(model, "layers")
    assert [c.name for c in attention] == [f"l{i}.attn" for i in range(LAYERS)]
    assert [c.name for c in mlp] == [f"l{i}.mlp" for i in range(LAYERS)]
    assert [c.name for c in layers] == [f"l{i}" for i in range(LAYERS)]
    for i in range(LAYERS):
        for comp in (attention[i], mlp[i], layers[i]):
            assert all(mask is None for mask in comp.masks.values())
            assert not comp.allow_overlap
        assert set(attention[i].masks) == _under(model, case.attn_path(i))
        assert set(attention[i].masks) == set(_attention_params(model, case, i))
        assert set(mlp[i].masks) == _under(model, f"{case.blocks}.{i}.{MLP[case.blocks]}")
        assert set(layers[i].masks) == _under(model, f"{case.blocks}.{i}")
        assert set(attention[i].masks) | set(mlp[i].masks) < set(layers[i].masks)
        rest = set(layers[i].masks) - set(attention[i].masks) - set(mlp[i].masks)
        assert rest and all("norm" in n or ".ln_" in n for n in rest)  # only the norms


def test_presets_cover_the_whole_model(base_model):
    """layers + embedding + unembedding = every parameter, each once (tied ones twice)."""
    case, model = base_model
    resolved = resolve_components(model, "layers,embedding,unembedding")
    assert [r.name for r in resolved] == [f"l{i}" for i in range(LAYERS)] + ["embed", "unembed"]
    names = set().union(*(r.entries for r in resolved))
    assert names == {n for n, _ in model.named_parameters()}
    assert all(index is None for r in resolved for index in r.entries.values())
    numel = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    extra = model.get_input_embeddings().weight.numel() if tied else 0
    assert sum(r.size for r in resolved) == numel + extra
    unembed = resolved[-1]
    out_name = canonical_parameter_names(model)[
        next(n for n, p in model.named_parameters(remove_duplicate=False)
             if p is model.get_output_embeddings().weight)]
    assert out_name in unembed.entries, "the output head belongs to 'unembed'"


def test_gpt2_tied_embeddings():
    model = _gpt2(tie=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    (embed,) = layer_components(model, "embedding")
    (unembed,) = layer_components(model, "unembedding")
    assert embed.name == "embed" and unembed.name == "unembed"
    assert set(embed.masks) == {"transformer.wte.weight", "transformer.wpe.weight"}
    # lm_head.weight is an alias: it appears under its canonical name
    assert set(unembed.masks) == {"transformer.ln_f.weight", "transformer.ln_f.bias",
                                  "transformer.wte.weight"}
    assert embed.allow_overlap and unembed.allow_overlap
    resolved = resolve_components(model, "embedding,unembedding")
    assert [r.name for r in resolved] == ["embed", "unembed"]

    # an alias names the canonical tensor; two aliases of one tensor are merged
    mask_a = torch.zeros_like(model.lm_head.weight, dtype=torch.bool)
    mask_a[:3] = True
    mask_b = torch.zeros_like(mask_a)
    mask_b[2:5] = True
    (r,) = resolve_components(model, {"rows": {"lm_head.weight": mask_a,
                                               "transformer.wte.weight": mask_b}})
    assert list(r.entries) == ["transformer.wte.weight"]
    assert r.size == 5 * HIDDEN
    assert torch.equal(r.entries["transformer.wte.weight"], (mask_a | mask_b).flatten()
                       .nonzero().squeeze(1))
    # an alias of a tensor another component owns still counts as overlap
    with pytest.raises(ValueError, match="overlap"):
        resolve_components(model, {"a": {"lm_head.weight": None},
                                   "b": {"transformer.wte.weight": mask_b}})


def test_untied_embeddings_do_not_overlap():
    model = _gpt2(tie=False)
    (embed,) = layer_components(model, "embedding")
    (unembed,) = layer_components(model, "unembedding")
    assert "lm_head.weight" in unembed.masks
    assert not embed.allow_overlap and not unembed.allow_overlap
    resolve_components(model, "embedding,unembedding")


def test_attention_preset_and_heads_overlap(base_model):
    """A layer's attention component contains all of its heads, so mixing the two is an
    overlap error, while heads and MLPs are disjoint."""
    case, model = base_model
    with pytest.raises(ValueError, match="overlap"):
        resolve_components(model, "heads,attention")
    resolved = resolve_components(model, "heads,mlp")
    assert [r.name for r in resolved] == (
        [f"l{i}h{h}" for i in range(LAYERS) for h in range(HEADS)]
        + [f"l{i}.mlp" for i in range(LAYERS)])


# ------------------------------------------------------------------------ validation


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


def test_default_and_preset_specs(gpt2):
    heads = [f"l{i}h{h}" for i in range(LAYERS) for h in range(HEADS)]
    assert [r.name for r in resolve_components(gpt2)] == heads
    assert [r.name for r in resolve_components(gpt2, "heads")] == heads
    assert [r.name for r in resolve_components(gpt2, " heads , mlp ")] == (
        heads + [f"l{i}.mlp" for i in range(LAYERS)])
    assert [r.name for r in resolve_components(gpt2, "attention,mlp,embedding")] == (
        [f"l{i}.attn" for i in range(LAYERS)] + [f"l{i}.mlp" for i in range(LAYERS)]
        + ["embed"])


def test_components_by_name_alone_or_mixed_with_presets(gpt2):
    by_name = {c.name: c for c in head_components(gpt2) + layer_components(gpt2, "mlp")}
    picked = resolve_components(gpt2, "l1h0, l0.mlp")
    expected = resolve_components(gpt2, [by_name["l1h0"], by_name["l0.mlp"]])
    assert [(r.name, r.size) for r in picked] == [(r.name, r.size) for r in expected]
    for a, b in zip(picked, expected):
        assert a.entries.keys() == b.entries.keys()
        for name in a.entries:
            assert torch.equal(a.entries[name], b.entries[name]) if b.entries[name] is not None \
                else a.entries[name] is None
    mixed = resolve_components(gpt2, ["mlp", "l0h1", Component("mine", {"lm_head.weight":
                                                                         None})])
    assert [r.name for r in mixed] == [f"l{i}.mlp" for i in range(LAYERS)] + ["l0h1", "mine"]
    with pytest.raises(ValueError, match=r"Unknown component 'l0h9' \(did you mean l0h"):
        resolve_components(gpt2, ["l0h9"])
    with pytest.raises(ValueError, match="Duplicate component name 'l0h1'"):
        resolve_components(gpt2, "heads,l0h1")
    with pytest.raises(TypeError, match="list"):
        resolve_components(gpt2, ["heads", 3])
    with pytest.raises(ValueError, match="none applies to this model: pass components by hand"):
        resolve_components(nn.Linear(2, 2), "l0h0")


def test_naming_a_head_builds_only_its_layer(gpt2, monkeypatch):
    import susc_callback.components.resolve as resolve

    built = []
    monkeypatch.setattr(resolve, "head_components", lambda model, **options: (
        built.append(options) or head_components(model, **options)))
    resolve_components(gpt2, "l1h0")
    assert built == [{"layers": {1}}]
    assert [c.name for c in head_components(gpt2, layers={1})] == [
        f"l1h{h}" for h in range(HEADS)]


@pytest.mark.parametrize("spec", ["", " , ", "heads,bogus_preset"])
def test_bad_preset_strings(gpt2, spec):
    with pytest.raises(ValueError, match="bogus_preset" if "bogus" in spec else "preset"):
        resolve_components(gpt2, spec)


def test_unsupported_architectures():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, vocab_size=VOCAB))
    with pytest.raises(ValueError, match=r"(?s)'bert'.*[Pp]ass components by hand"):
        resolve_components(bert)
    with pytest.raises(ValueError, match=r"(?s)'bert'.*[Pp]ass components by hand"):
        resolve_components(bert, "mlp")
    sequential = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    for call in (lambda: resolve_components(sequential),
                 lambda: head_components(sequential),
                 lambda: layer_components(sequential, "layers")):
        with pytest.raises(ValueError, match=r"(?s)Sequential.*[Pp]ass components by hand"):
            call()
    # a supported model_type whose module tree is not the causal-LM layout
    base = GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="by hand"):
        resolve_components(base)


def test_user_dict_spec_on_any_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    rows = torch.zeros(2, 4, dtype=torch.bool)
    rows[1] = True
    cols = np.zeros((2, 4), dtype=bool)  # numpy bool masks are accepted too
    cols[0, :2] = True
    resolved = resolve_components(model, {
        "first": {"0.weight": None, "0.bias": None},
        "second_row": {"2.weight": rows, "2.bias": torch.tensor([False, True])},
        "second_col": {"2.weight": cols},  # disjoint from second_row
    })
    first, row, col = resolved
    assert [r.name for r in resolved] == ["first", "second_row", "second_col"]
    assert first.entries == {"0.weight": None, "0.bias": None} and first.size == 16
    assert not first.allow_overlap
    assert row.entries["2.weight"].tolist() == [4, 5, 6, 7]
    assert row.entries["2.bias"].tolist() == [1]
    assert row.size == 5
    assert col.entries["2.weight"].tolist() == [0, 1] and col.size == 2


def test_component_objects_and_lists():
    model = nn.Linear(3, 2)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    one = Component("w00", {"weight": mask})
    assert [r.name for r in resolve_components(model, one)] == ["w00"]
    both = resolve_components(model, [one, Component("bias", {"bias": None})])
    assert [(r.name, r.size) for r in both] == [("w00", 1), ("bias", 2)]
    with pytest.raises(ValueError, match="empty"):
        resolve_components(model, [])
    with pytest.raises(TypeError, match="int"):
        resolve_components(model, 42)
    with pytest.raises(TypeError, match="list"):
        resolve_components(model, {"bad": ["weight"]})


@pytest.fixture
def tiny():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_unknown_parameter(tiny):
    with pytest.raises(ValueError, match=r"'mine'.*'0.wieght'.*did you mean.*'0.weight'"):
        resolve_components(tiny, {"mine": {"0.wieght": None}})
    with pytest.raises(ValueError, match="'nonexistent.weight'"):
        resolve_components(tiny, {"mine": {"nonexistent.weight": None}})


def test_wrong_mask_shape(tiny):
    with pytest.raises(ValueError, match=r"'0.weight'.*\(3, 4\).*\(4, 3\)"):
        resolve_components(tiny, {"mine": {"0.weight": torch.ones(3, 4, dtype=torch.bool)}})
    with pytest.raises(ValueError, match=r"'0.bias'.*shape"):
        resolve_components(tiny, {"mine": {"0.bias": torch.ones(1, 4, dtype=torch.bool)}})


@pytest.mark.parametrize("mask", [torch.ones(4, 3), torch.ones(4, 3, dtype=torch.long),
                                  np.ones((4, 3), dtype=np.int64)],
                         ids=["float", "long", "numpy-int"])
def test_non_bool_mask(tiny, mask):
    with pytest.raises(ValueError, match=r"'0.weight'.*dtype.*torch.bool"):
        resolve_components(tiny, {"mine": {"0.weight": mask}})


def test_empty_components(tiny):
    with pytest.raises(ValueError, match="'nothing'.*empty"):
        resolve_components(tiny, {"nothing": {}})
    with pytest.raises(ValueError, match="'all_false'.*empty"):
        resolve_components(tiny, {"all_false": {
            "0.weight": torch.zeros(4, 3, dtype=torch.bool),
            "0.bias": torch.zeros(4, dtype=torch.bool)}})


def test_overlapping_user_components(tiny):
    a = torch.zeros(4, 3, dtype=torch.bool)
    a[0] = True
    b = torch.zeros(4, 3, dtype=torch.bool)
    b[:, 0] = True  # shares entry (0, 0) with a
    with pytest.raises(ValueError, match=r"'a'.*'b'.*overlap.*'0.weight'.*allow_overlap"):
        resolve_components(tiny, {"a": {"0.weight": a}, "b": {"0.weight": b}})
    with pytest.raises(ValueError, match=r"'a'.*'whole'.*overlap"):
        resolve_components(tiny, {"a": {"0.weight": a}, "whole": {"0.weight": None}})
    # one side allowing it is not enough
    with pytest.raises(ValueError, match="overlap"):
        resolve_components(tiny, [Component("a", {"0.weight": a}, allow_overlap=True),
                                  Component("b", {"0.weight": b})])
    both = resolve_components(tiny, [Component("a", {"0.weight": a}, allow_overlap=True),
                                     Component("b", {"0.weight": b}, allow_overlap=True)])
    assert [r.size for r in both] == [3, 4]
    # disjoint masks on one tensor are fine without allow_overlap
    resolve_components(tiny, {"a": {"0.weight": a}, "b": {"0.weight": b & ~a}})


def test_duplicate_and_reserved_names(tiny):
    with pytest.raises(ValueError, match="Duplicate.*'x'"):
        resolve_components(tiny, [Component("x", {"0.bias": None}),
                                  Component("x", {"2.bias": None})])
    with pytest.raises(ValueError, match="'full'.*reserved"):
        resolve_components(tiny, {"full": {"0.bias": None}})
    with pytest.raises(ValueError, match="'full'"):
        resolve_components(tiny, [Component("full", {"0.bias": None})])
