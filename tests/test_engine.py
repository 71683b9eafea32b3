"""Engine behaviour: isolation from the caller, restriction, seeding, prefix replay, errors."""

from __future__ import annotations

import copy
import random
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, NEEDS_CUDA, tiny_gpt2
from torch import nn

from susc_callback import (
    ChainDivergedError,
    Component,
    ProbeSet,
    SGLDConfig,
    estimate_susceptibilities,
    head_components,
)
from susc_callback.components.resolve import resolve_components
from susc_callback.sampler.divergence import DivergenceWatch
from susc_callback.sampler.group import GroupLosses
from susc_callback.sampler.prefix import PrefixReplay
from susc_callback.sampler.sgld import chain_seed, make_generator


def _estimate(model, probe, sampling_ids, config, components=None, **kwargs):
    return estimate_susceptibilities(model, components, sampling_ids, probe, config, **kwargs)


# -- a brute-force reference: one chain at a time, full forward/backward, masked update ----

def _token_losses(model, batch):
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    logits = model(input_ids=ids, attention_mask=mask).logits
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    valid = torch.ones_like(losses, dtype=torch.bool)
    if mask is not None:
        valid &= mask[:, :-1].bool() & mask[:, 1:].bool()
    return losses, valid


def _reference_draws(model, masks, data, probe, cfg, name, device="cpu"):
    """(L, l_x) at every draw of every chain, computed the plain way on ``device``."""
    device = torch.device(device)
    m = cfg.observable_sequences
    order = torch.randperm(len(data), generator=make_generator(
        torch.device("cpu"), chain_seed(cfg.seed, "observable")))
    observable = {"input_ids": data[order[:m]].to(device)}
    probe_batch = {"input_ids": probe.input_ids.to(device),
                   "attention_mask": probe.attention_mask.to(device)}
    draws = []
    for chain in range(cfg.num_chains):
        work = copy.deepcopy(model).float().eval().to(device)
        params = dict(work.named_parameters())
        start = {k: v.detach().clone() for k, v in params.items()}
        noise = make_generator(device, chain_seed(cfg.seed, "noise", name, chain))
        batches = make_generator(torch.device("cpu"), chain_seed(cfg.seed, "batches", chain))
        perm = torch.empty(0, dtype=torch.long)
        for _ in range(cfg.num_steps):
            if len(perm) < cfg.batch_size:
                perm = torch.randperm(len(data), generator=batches)
            index, perm = perm[:cfg.batch_size], perm[cfg.batch_size:]
            losses, valid = _token_losses(work, {"input_ids": data[index].to(device)})
            loss = losses[valid].mean()
            work.zero_grad()
            loss.backward()
            with torch.no_grad():
                obs_losses, obs_valid = _token_losses(work, observable)
                probe_losses, probe_valid = _token_losses(work, probe_batch)
                draws.append((obs_losses[obs_valid].mean().double().cpu(),
                               probe_losses[probe_valid].double().cpu()))
                for pname, mask in masks.items():
                    p = params[pname]
                    sel = torch.ones_like(p, dtype=torch.bool) if mask is None else mask
                    u, u0 = p[sel], start[pname][sel]
                    xi = torch.randn(u.shape, generator=noise, device=device)
                    u = u - cfg.step_size / 2 * (cfg.n_beta * p.grad[sel]
                                                 + cfg.gamma * (u - u0)) + cfg.step_size**0.5 * xi
                    p[sel] = u
    return draws


@pytest.mark.parametrize("device", DEVICES)
def test_engine_matches_brute_force_reference(gpt2, probe, sampling_ids, config, device):
    """Prefix replay, lockstep groups and pruned backward give the plain loop's numbers."""
    heads = head_components(gpt2)
    chosen = [heads[0], heads[3]]  # one head in each layer: prefix depth 0 and 1
    result = _estimate(gpt2, probe, sampling_ids, config.replace(device=device),
                       components=chosen)
    full_masks = {name: None for name, _ in gpt2.named_parameters()}
    full = _reference_draws(gpt2, full_masks, sampling_ids, probe, config, "full", device)
    anchor_ids = sampling_ids[torch.randperm(len(sampling_ids), generator=make_generator(
        torch.device("cpu"), chain_seed(config.seed, "observable")))[:4]]
    with torch.no_grad():
        losses, valid = _token_losses(copy.deepcopy(gpt2).float(), {"input_ids": anchor_ids})
    anchor = losses[valid].mean().double()
    e_full = torch.stack([lx - L for L, lx in full]).mean(0)
    for row, component in enumerate(chosen):
        draws = _reference_draws(gpt2, component.masks, sampling_ids, probe, config,
                                 component.name, device)
        phi = torch.stack([L - anchor for L, _ in draws])
        delta = torch.stack([lx - L for L, lx in draws])
        chi = -((phi[:, None] * delta).mean(0) - phi.mean() * e_full)
        # Losses (~4 nats) are float32: one ulp is 4.8e-7, and the two implementations sum
        # tokens in different orders, so phi and chi agree to a few ulps, not bitwise.
        np.testing.assert_allclose(result.chi[row], chi.numpy(), rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(result.mean_phi[row], phi.mean().item(), rtol=1e-4, atol=2e-6)


# -- isolation ------------------------------------------------------------------------------

def _model_state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
            [m.training for m in model.modules()])


def _assert_same_state(before, after):
    for name in before[0]:
        assert torch.equal(before[0][name], after[0][name]), name
    assert before[1] == after[1]
    for name, grad in before[2].items():
        assert (grad is None) == (after[2][name] is None) and (
            grad is None or torch.equal(grad, after[2][name])), name
    assert before[3] == after[3]


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), cuda


def _assert_same_rng(before, after):
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1])
    assert before[2] == after[2]
    assert len(before[3]) == len(after[3])
    assert all(torch.equal(a, b) for a, b in zip(before[3], after[3]))


def _prepared_model(device="cpu"):
    model = tiny_gpt2(resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1).train().to(device)
    model.transformer.wpe.weight.requires_grad_(False)  # a frozen flag that must survive
    model(input_ids=torch.zeros(2, 4, dtype=torch.long, device=device)).logits.sum().backward()
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_caller_model_and_rng_untouched(probe, sampling_ids, config, device):
    model = _prepared_model(device)
    before, rng = _model_state(model), _rng_state()
    _estimate(model, probe, sampling_ids, config)
    _assert_same_state(before, _model_state(model))
    _assert_same_rng(rng, _rng_state())


NEW_PRECISION_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9


@pytest.mark.parametrize("allow", ["tf32 (new API)", "medium (legacy API)"])
def test_reduced_precision_matmuls_are_off_inside_and_restored_after(gpt2, probe, sampling_ids,
                                                                     config, allow):
    """A script that allows TF32 (GPU) or bfloat16 (oneDNN, CPU) float32 matmuls gets true
    float32 sampling, and its setting back."""
    if not NEW_PRECISION_API:
        pytest.skip("PyTorch < 2.9 has no per-backend fp32_precision settings")
    backends = torch.backends
    seen = []

    def loss_fn(m, batch):
        seen.append((backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision))
        logits = m(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                               reduction="none")

    saved = (backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision)
    try:
        if allow.startswith("tf32"):
            backends.cuda.matmul.fp32_precision = "tf32"
        else:
            torch.set_float32_matmul_precision("medium")
        before = (backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision)
        _estimate(gpt2, probe, sampling_ids, config, loss_fn=loss_fn)
        assert (backends.cuda.matmul.fp32_precision,
                backends.mkldnn.matmul.fp32_precision) == before
        if allow.startswith("medium"):
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision = saved
    assert seen and set(seen) == {("ieee", "ieee")}


def test_caller_model_and_rng_untouched_when_a_chain_diverges(probe, sampling_ids, config):
    model = _prepared_model()
    before, rng = _model_state(model), _rng_state()
    pattern = r"chain 0 of component '\w+' diverged at step \d+"
    with pytest.raises(ChainDivergedError, match=pattern):
        _estimate(model, probe, sampling_ids, config.replace(step_size=1e6, gamma=0.0))
    _assert_same_state(before, _model_state(model))
    _assert_same_rng(rng, _rng_state())


def test_samples_float32_in_eval_mode(probe, sampling_ids, config):
    model = tiny_gpt2(resid_pdrop=0.5).to(torch.bfloat16).train()
    seen = []

    def loss_fn(m, batch):
        seen.append((m.training, next(m.parameters()).dtype))
        logits = m(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                               reduction="none")

    _estimate(model, probe, sampling_ids, config, loss_fn=loss_fn)
    assert seen and all(mode == (False, torch.float32) for mode in seen)
    assert model.training and next(model.parameters()).dtype == torch.bfloat16


# -- restriction ----------------------------------------------------------------------------

def test_restricted_chain_moves_exactly_its_entries(gpt2, probe, sampling_ids, config):
    """Every forward pass sees w* outside the component's mask and moved entries inside it."""
    mask = torch.zeros_like(gpt2.transformer.h[1].attn.c_attn.weight, dtype=torch.bool)
    mask[3:7, 5:20] = True
    component = Component("patch", {"transformer.h.1.attn.c_attn.weight": mask})
    start = {k: v.detach().clone() for k, v in gpt2.named_parameters()}
    snapshots = []

    def loss_fn(m, batch):
        snapshots.append({k: v.detach().clone() for k, v in m.named_parameters()})
        logits = m(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                               reduction="none")

    _estimate(gpt2, probe, sampling_ids, config, components=[component], loss_fn=loss_fn)
    name = "transformer.h.1.attn.c_attn.weight"
    untouched_wte = [p for p in snapshots
                     if torch.equal(p["transformer.wte.weight"], start["transformer.wte.weight"])]
    component_calls = [p for p in untouched_wte if not torch.equal(p[name], start[name])]
    assert len(component_calls) > 0
    for params in untouched_wte:  # the component's calls (and w* itself)
        for other, value in params.items():
            if other != name:
                assert torch.equal(value, start[other]), other
        assert torch.equal(params[name][~mask], start[name][~mask])
    assert len(untouched_wte) < len(snapshots)  # the full chain moved everything else


# -- seeding --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_fixed_seed_reproduces_and_components_are_independent(gpt2, probe, sampling_ids,
                                                              config, device):
    gpt2.to(device)
    heads = head_components(gpt2)
    together = _estimate(gpt2, probe, sampling_ids, config, components=heads)
    again = _estimate(gpt2, probe, sampling_ids, config, components=heads)
    assert np.array_equal(together.chi, again.chi)
    # Same random streams whatever runs beside a component; run alone it is evaluated one
    # chain at a time rather than stacked, so only float rounding may differ.
    reversed_run = _estimate(gpt2, probe, sampling_ids, config, components=heads[::-1])
    alone = _estimate(gpt2, probe, sampling_ids, config, components=[heads[2]])
    np.testing.assert_allclose(reversed_run.chi[::-1], together.chi, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(alone.chi[0], together.chi[2], rtol=1e-5, atol=1e-7)
    other_seed = _estimate(gpt2, probe, sampling_ids, config.replace(seed=1), components=heads)
    assert not np.array_equal(other_seed.chi, together.chi)


def test_phi_is_zero_at_the_checkpoint(gpt2, probe, sampling_ids, config):
    """The first draw (no burn-in) is w* itself, so L equals the anchor exactly."""
    result = _estimate(gpt2, probe, sampling_ids, config)
    assert np.array_equal(result.loss_traces[:, :, 0],
                          np.broadcast_to(result.anchor_loss[:, None], (4, 2)))


def test_separate_batch_anchor_offsets_phi(gpt2, probe, sampling_ids, config):
    result = _estimate(gpt2, probe, sampling_ids, config.replace(anchor="separate-batches"))
    assert not np.allclose(result.loss_traces[:, :, 0], result.anchor_loss[:, None])


def test_minibatch_observable(gpt2, probe, sampling_ids, config):
    result = _estimate(gpt2, probe, sampling_ids, config.replace(observable="minibatch"))
    assert np.isfinite(result.chi).all()
    assert np.array_equal(result.loss_traces[:, :, 0], result.loss_traces[:, :, 0])


# -- divergence -----------------------------------------------------------------------------

def test_divergence_marked_and_other_components_kept(gpt2, probe, sampling_ids, config):
    heads = head_components(gpt2)
    poison = Component("poison", {"transformer.h.0.mlp.c_fc.weight": None})
    c_fc = gpt2.transformer.h[0].mlp.c_fc.weight.detach().clone()
    wte = gpt2.transformer.wte.weight.detach().clone()

    def loss_fn(m, batch):
        """NaN whenever only the poison component has moved."""
        logits = m(input_ids=batch["input_ids"]).logits
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                                 reduction="none")
        poisoned = (not torch.equal(m.transformer.h[0].mlp.c_fc.weight, c_fc)
                    and torch.equal(m.transformer.wte.weight, wte))
        return losses * (float("nan") if poisoned else 1.0)

    with pytest.warns(RuntimeWarning, match="component 'poison' diverged at step 1"):
        result = _estimate(gpt2, probe, sampling_ids, config.replace(on_divergence="mark"),
                           components=[heads[3], poison], loss_fn=loss_fn)
    assert list(result.failed) == ["poison"]
    assert np.isnan(result.chi[1]).all() and np.isfinite(result.chi[0]).all()
    with pytest.raises(ChainDivergedError, match="Lower step_size or raise gamma"):
        _estimate(gpt2, probe, sampling_ids, config, components=[poison], loss_fn=loss_fn)


# -- input errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"step_size": -1.0}, "step_size: -1.0"),
    ({"n_beta": float("nan")}, "n_beta"),
    ({"gamma": -2.0}, "gamma: -2.0"),
    ({"num_draws": 0}, "num_draws: 0"),
    ({"observable": "batch"}, "observable: 'batch'"),
    ({"anchor": "devinterp"}, "anchor: 'devinterp'"),
])
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        SGLDConfig(**change)


def test_too_little_sampling_data(gpt2, probe, sampling_ids, config):
    with pytest.raises(ValueError, match="fewer than batch_size = 30"):
        _estimate(gpt2, probe, sampling_ids, config.replace(batch_size=30))


def test_bad_loss_fn_output(gpt2, probe, sampling_ids, config):
    with pytest.raises(ValueError, match="loss_fn must return"):
        _estimate(gpt2, probe, sampling_ids, config,
                  loss_fn=lambda m, b: torch.zeros(2, 2, 2))


def test_probe_validation():
    with pytest.raises(ValueError, match="2 sequences but 3 dataset labels"):
        ProbeSet.from_tensors(torch.zeros(2, 5, dtype=torch.long), datasets=["a", "b", "c"])
    with pytest.raises(ValueError, match="integer tensor"):
        ProbeSet.from_tensors(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ProbeSet.from_tensors(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))


def test_generic_module_with_custom_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(40, 3), torch.randn(40)
    probe = ProbeSet.from_batch({"x": x[:6], "y": y[:6]}, datasets=["p"] * 3 + ["q"] * 3)

    def loss_fn(m, batch):
        return (m(batch["x"]).squeeze(-1) - batch["y"]) ** 2

    components = {"first": {"0.weight": None, "0.bias": None}, "second": {"2.weight": None}}
    cfg = SGLDConfig(num_chains=2, num_draws=10, batch_size=8, observable_sequences=8,
                     progress=False)
    result = estimate_susceptibilities(model, components, {"x": x, "y": y}, probe, cfg,
                                       loss_fn=loss_fn)
    assert result.chi.shape == (2, 6) and result.dataset_chi.shape == (2, 2)
    assert np.allclose(result.dataset_chi[:, 0], result.chi[:, :3].mean(1))
    assert resolve_components(model, components)[0].size == 16


# -- prefix replay on every supported architecture -------------------------------------------

def _tiny_causal_lm(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=32)
    extra = {"llama": dict(num_key_value_heads=2, head_dim=8),
             "mistral": dict(num_key_value_heads=2), "qwen2": dict(num_key_value_heads=4),
             "gpt_neox": dict(rotary_pct=0.5)}[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **common, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gpt_neox"])
def test_prefix_replay_matches_full_forward(model_type, probe, sampling_ids, config,
                                            monkeypatch):
    """Replaying frozen blocks changes no number: same result with replay switched off."""
    model = _tiny_causal_lm(model_type)
    components = "heads,mlp,unembedding"
    replayed = _estimate(model, probe, sampling_ids, config, components=components)
    real = PrefixReplay.frozen_blocks  # every parameter used before any block: no replay
    monkeypatch.setattr(PrefixReplay, "frozen_blocks",
                        lambda prefix, run: dict.fromkeys(real(prefix, run), 0))
    recomputed = _estimate(model, probe, sampling_ids, config, components=components)
    assert replayed.component_names == recomputed.component_names
    np.testing.assert_allclose(replayed.chi, recomputed.chi, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(replayed.rllc, recomputed.rllc, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(("model_type", "components", "device"), [
    ("gpt2", "heads,mlp", "cpu"), ("gpt2", "norms", "cpu"), ("llama", "heads,mlp", "cpu"),
    ("gpt_neox", "heads,mlp", "cpu"), ("gpt_neox", "layers", "cpu"),
    pytest.param("gpt2", "heads,mlp", "cuda", marks=NEEDS_CUDA)])
def test_stacked_chains_match_sequential(model_type, components, device, probe, sampling_ids,
                                         config):
    """A group's chains stacked into one batch (at most 3 chains per batch, forward passes
    sliced to 4 rows) give the one-at-a-time numbers: Linear, Conv1D and LayerNorm. On a
    GPU with TF32 allowed by the caller: the engine computes in true float32."""
    model = tiny_gpt2() if model_type == "gpt2" else _tiny_causal_lm(model_type)
    model.to(device)
    if not NEW_PRECISION_API:
        _assert_stacking_exact(model, components, probe, sampling_ids, config)
        return
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.allow_tf32 = True  # what a training script may have done
    try:
        _assert_stacking_exact(model, components, probe, sampling_ids, config)
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def _assert_stacking_exact(model, components, probe, sampling_ids, config):
    if components == "norms":  # two LayerNorms of one block: one group of two chains
        components = {f"ln_{i}": {f"transformer.h.0.ln_{i}.weight": None,
                                  f"transformer.h.0.ln_{i}.bias": None} for i in (1, 2)}
    sequential = _estimate(model, probe, sampling_ids, config.replace(batch_chains="off"),
                           components=components)
    stacked = _estimate(model, probe, sampling_ids,
                        config.replace(batch_chains="on", max_batched_chains=3,
                                       eval_batch_size=4), components=components)
    np.testing.assert_allclose(stacked.chi, sequential.chi, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(stacked.mean_phi, sequential.mean_phi, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(stacked.loss_traces, sequential.loss_traces, rtol=1e-5)


def test_stacking_a_group_of_one_and_a_group_without_restricted_chains(gpt2, probe,
                                                                       sampling_ids, config):
    """Heads of layer 1 only: the layer-0 group holds just the full chain."""
    heads = head_components(gpt2)[2:]
    on = _estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="on"),
                   components=heads[:1])
    off = _estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="off"),
                    components=heads[:1])
    np.testing.assert_allclose(on.chi, off.chi, rtol=1e-4, atol=2e-6)


def test_batches_split_when_out_of_memory(gpt2, probe, sampling_ids, config, monkeypatch):
    """A batch that does not fit is halved and retried, with the same numbers."""
    sizes = []
    real = GroupLosses.evaluate_stacked

    def small_device(group, chains, *args):
        sizes.append(len(chains))
        if len(chains) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(group, chains, *args)

    reference = _estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="on"))
    monkeypatch.setattr(GroupLosses, "evaluate_stacked", small_device)
    with pytest.warns(RuntimeWarning, match="Out of memory with 2 chains"):
        split = _estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="on"))
    assert sizes[:3] == [2, 1, 1] and max(sizes[3:]) == 1
    np.testing.assert_allclose(split.chi, reference.chi, rtol=1e-5, atol=1e-8)


class _LinearHeads(torch.nn.Module):
    """Six Linear "heads"; optionally the last one's weight is also read outside its module,
    as a tied weight can be: stacking it would silently use w* there."""

    def __init__(self, misused: bool) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(6))
        self.misused = misused

    def forward(self, x):
        hidden = sum(torch.tanh(head(x)) for head in self.heads)
        if self.misused:
            hidden = hidden + F.linear(x, self.heads[-1].weight) ** 2
        return hidden.sum(-1)


def _squared_error(m, batch):
    return (m(batch["x"]) - batch["y"]) ** 2


def _regression_estimate(model, config, batch_chains, *, components=None, batch=None,
                         collate_fn=None, loss_fn=_squared_error):
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randn(40)
    probe = ProbeSet.from_batch({"x": x[:6], "y": y[:6]})
    components = components or {f"h{i}": {f"heads.{i}.weight": None, f"heads.{i}.bias": None}
                                for i in range(6)}

    return estimate_susceptibilities(model, components, batch or {"x": x, "y": y}, probe,
                                     config.replace(batch_chains=batch_chains),
                                     loss_fn=loss_fn, collate_fn=collate_fn)


def _spy_on_stacking_check(monkeypatch) -> list:
    """Records every stacking check the engine runs (each a list of chain names)."""
    checked = []

    real = GroupLosses.check_stacking

    def spy(group, chains):
        checked.append([chain.name for chain in chains])
        return real(group, chains)

    monkeypatch.setattr(GroupLosses, "check_stacking", spy)
    return checked


@pytest.mark.parametrize("misused", [False, True])
def test_stacking_is_checked_against_one_at_a_time(misused, config, monkeypatch):
    """Every chain is checked, not only the first few: the misused weight is the sixth."""
    torch.manual_seed(0)
    model = _LinearHeads(misused)
    config = config.replace(eval_batch_size=32)  # 6 chains x 4 rows: "auto" stacks on a CPU
    checked = _spy_on_stacking_check(monkeypatch)
    sequential = _regression_estimate(model, config, "off")
    auto = _regression_estimate(model, config, "auto")  # stacked when exact, else one by one
    assert checked == [[f"h{i}" for i in range(6)]]
    np.testing.assert_allclose(auto.chi, sequential.chi, rtol=1e-4, atol=1e-6)
    if misused:
        with pytest.raises(ValueError, match="'h5' differs from evaluating it alone.*"
                                             "batch_chains='off'"):
            _regression_estimate(model, config, "on")


def test_a_loss_coupling_samples_is_not_stacked(config, monkeypatch):
    """A loss that mixes the rows of a batch would mix the stacked chains' rows."""
    def coupled(m, batch):
        prediction = m(batch["x"])
        return (prediction - batch["y"]) ** 2 + prediction.mean()

    model = _LinearHeads(False)
    config = config.replace(eval_batch_size=32)  # 6 chains x 4 rows: "auto" stacks on a CPU
    checked = _spy_on_stacking_check(monkeypatch)
    sequential = _regression_estimate(model, config, "off", loss_fn=coupled)
    auto = _regression_estimate(model, config, "auto", loss_fn=coupled)
    assert len(checked) == 1  # "auto" checked, found the coupling and ran one by one
    np.testing.assert_allclose(auto.chi, sequential.chi, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="differs from evaluating it alone.*couple samples"):
        _regression_estimate(model, config, "on", loss_fn=coupled)


def test_an_instance_level_forward_wrapper_survives_stacking(config):
    """A wrapper installed on a module instance (as accelerate's hooks are) stays in force."""
    torch.manual_seed(0)
    model = _LinearHeads(False)
    unwrapped = model.heads[2].forward
    model.heads[2].forward = lambda x: unwrapped(x) * 2.0
    auto = _regression_estimate(model, config, "auto")
    reference = _regression_estimate(model, config, "off")
    np.testing.assert_allclose(auto.chi, reference.chi, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be stacked"):
        _regression_estimate(model, config, "on")


def test_batches_with_namedtuples_and_lists_fall_back_or_pass_through(config):
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randn(40)
    examples = [{"x": x[i], "y": y[i], "pair": Pair(x[i], y[i]), "tag": f"row{i}"}
                for i in range(40)]

    def collate(rows):
        return {"x": torch.stack([r["x"] for r in rows]), "y": torch.stack([r["y"] for r in rows]),
                "pair": Pair(torch.stack([r["pair"].x for r in rows]),
                             torch.stack([r["pair"].y for r in rows])),
                "tag": [r["tag"] for r in rows]}

    model = _LinearHeads(False)
    off = _regression_estimate(model, config, "off", batch=examples, collate_fn=collate)
    auto = _regression_estimate(model, config, "auto", batch=examples, collate_fn=collate)
    np.testing.assert_allclose(auto.chi, off.chi, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="per-sample values that are not tensors"):
        _regression_estimate(model, config, "on", batch=examples, collate_fn=collate)


def test_a_loss_fn_whose_width_depends_on_the_batch_is_not_sliced(gpt2, sampling_ids, config):
    """Trimming padding shared by the batch changes K per slice: stacking (which slices
    probe chunks) falls back to one chain at a time, with the same numbers."""
    def loss_fn(m, batch):
        width = int(batch["attention_mask"].sum(1).max())
        ids, mask = batch["input_ids"][:, :width], batch["attention_mask"][:, :width]
        logits = m(input_ids=ids, attention_mask=mask).logits
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return losses, (mask[:, :-1] & mask[:, 1:]).bool()

    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[:4, 10:] = 0  # the first half shorter than the second
    mask[4:, 13:] = 0
    probe = ProbeSet.from_tensors(ids, mask)
    data = {"input_ids": sampling_ids, "attention_mask": torch.ones_like(sampling_ids)}
    components = {"fc": {"transformer.h.0.mlp.c_fc.weight": None},
                  "proj": {"transformer.h.0.mlp.c_proj.weight": None}}
    settings = config.replace(batch_size=4, eval_batch_size=8)
    off = estimate_susceptibilities(gpt2, components, data, probe,
                                    settings.replace(batch_chains="off"), loss_fn=loss_fn)
    auto = estimate_susceptibilities(gpt2, components, data, probe, settings, loss_fn=loss_fn)
    np.testing.assert_allclose(auto.chi, off.chi, rtol=1e-4, atol=2e-6)


def test_stacking_needs_linear_conv1d_or_layernorm_modules(gpt2, probe, sampling_ids,
                                                           config):
    even_rows = (torch.arange(64)[:, None] % 2 == 0).expand(64, 16)
    components = {"emb0": {"transformer.wte.weight": even_rows},
                  "emb1": {"transformer.wte.weight": ~even_rows}}
    with pytest.raises(ValueError, match="transformer.wte.weight belongs to a Embedding"):
        _estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="on"),
                  components=components)
    auto = _estimate(gpt2, probe, sampling_ids, config, components=components)
    off = _estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="off"),
                    components=components)
    assert np.array_equal(auto.chi, off.chi)


def test_progress_bar_only_when_asked(gpt2, probe, sampling_ids, config, capsys):
    _estimate(gpt2, probe, sampling_ids, config.replace(progress=True))
    assert "SGLD" in capsys.readouterr().err
    _estimate(gpt2, probe, sampling_ids, config.replace(progress=None))  # stderr not a tty
    assert "SGLD" not in capsys.readouterr().err


def test_inputs_that_do_not_fit_the_model_are_named(gpt2, sampling_ids, config):
    too_long = ProbeSet.from_tensors(torch.zeros(2, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="probe sequences have 40 tokens, more than the "
                                         "model's context of 16"):
        _estimate(gpt2, too_long, sampling_ids, config)
    out_of_vocab = ProbeSet.from_tensors(torch.full((2, 8), 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids in \[64, 64\], outside the model's "
                                         r"vocabulary \[0, 63\]"):
        _estimate(gpt2, out_of_vocab, sampling_ids, config)
    probe = ProbeSet.from_tensors(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sampling_data holds token ids"):
        _estimate(gpt2, probe, sampling_ids + 64, config)


def test_runs_inside_no_grad_and_inference_mode(gpt2, probe, sampling_ids, config):
    reference = _estimate(gpt2, probe, sampling_ids, config)
    with torch.no_grad():
        quiet = _estimate(gpt2, probe, sampling_ids, config)
    with torch.inference_mode():
        inference = _estimate(gpt2, probe, sampling_ids, config)
    assert np.array_equal(quiet.chi, reference.chi)
    assert np.array_equal(inference.chi, reference.chi)


def test_parameters_the_loss_never_uses(config):
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 1), "unused": torch.nn.Linear(2, 1)})
    x, y = torch.randn(20, 2), torch.randn(20)
    probe = ProbeSet.from_batch({"x": x[:4], "y": y[:4]})

    def loss_fn(m, batch):
        return (m["used"](batch["x"]).squeeze(-1) - batch["y"]) ** 2

    result = estimate_susceptibilities(model, {"w": {"used.weight": None},
                                               "idle": {"unused.weight": None}},
                                       {"x": x, "y": y}, probe, config, loss_fn=loss_fn)
    assert np.isfinite(result.chi).all()
    assert np.allclose(result.mean_phi[1], 0.0, atol=1e-4)  # moves, but only as noise


def test_left_and_right_padding_give_the_same_token_losses(gpt2):
    from susc_callback.data.sampling import causal_lm_token_losses

    ids = torch.tensor([[5, 9, 2, 7, 0, 0], [0, 0, 5, 9, 2, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        losses, valid = causal_lm_token_losses(gpt2, {"input_ids": ids,
                                                      "attention_mask": mask})
    torch.testing.assert_close(losses[0][valid[0]], losses[1][valid[1]], rtol=1e-5, atol=1e-6)


def test_int32_token_ids_and_bad_batches(gpt2, probe, sampling_ids, config):
    result = _estimate(gpt2, probe, sampling_ids.int(), config, components="layers")
    assert np.isfinite(result.chi).all()
    examples = [{"input_ids": row.tolist()} for row in sampling_ids]
    with pytest.raises(ValueError, match="with_format\\('torch'\\)"):
        _estimate(gpt2, probe, examples, config, collate_fn=lambda rows: {
            "input_ids": [r["input_ids"] for r in rows]})


def test_loss_fn_mask_of_the_wrong_shape(gpt2, probe, sampling_ids, config):
    def loss_fn(m, batch):
        losses = torch.ones(batch["input_ids"].shape, requires_grad=True)
        return losses, torch.ones(len(losses), dtype=torch.bool)

    pattern = r"validity mask of shape \(3,\) for losses of shape \(3, 16\)"
    with pytest.raises(ValueError, match=pattern):
        _estimate(gpt2, probe, sampling_ids, config, loss_fn=loss_fn)


@pytest.mark.parametrize("batch_chains", ["off", "on"])
def test_a_loss_fn_with_the_wrong_number_of_losses_is_named(gpt2, probe, sampling_ids,
                                                            config, batch_chains):
    def loss_fn(m, batch):
        ids = batch["input_ids"]
        logits = m(input_ids=ids).logits
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                 reduction="none")
        return losses[losses > 0][:4]  # not one loss per sample

    with pytest.raises(ValueError, match="loss_fn returned 4 per-sample losses for a batch "
                                         "of \\d+ samples"):
        _estimate(gpt2, probe, sampling_ids, config.replace(batch_chains=batch_chains),
                  loss_fn=loss_fn)


def test_first_draw_at_the_checkpoint_is_evaluated_once(gpt2, probe, sampling_ids, config,
                                                        monkeypatch):
    """Without burn-in every chain's first draw is at w*: the probe is evaluated there once
    per estimate, not once per chain (chains run in prefix groups of depth 0 and 1)."""
    from susc_callback.sampler.group import GroupLosses

    calls = []  # one depth per chain evaluated
    real = GroupLosses.probe_losses

    def counted(self, stack=None):
        calls.extend([self.depth] * (1 if stack is None else stack.count))
        return real(self, stack)

    monkeypatch.setattr(GroupLosses, "probe_losses", counted)
    result = _estimate(gpt2, probe, sampling_ids, config)
    chain_draws = (len(result.component_names) + 1) * config.num_chains * config.num_draws
    checkpoint_draws = (len(result.component_names) + 1) * config.num_chains
    assert len(calls) == chain_draws - checkpoint_draws + 1
    assert sorted(set(calls)) == [0, 1]
    moved = _estimate(gpt2, probe, sampling_ids, config.replace(num_burnin=1))
    at_anchor = np.broadcast_to(moved.anchor_loss[:, None], moved.loss_traces.shape[:2])
    assert not np.array_equal(moved.loss_traces[:, :, 0], at_anchor)  # burn-in: not shared


def test_divergence_watch_reports_the_first_bad_step_of_each_chain_once():
    """Flags are read in blocks of steps; the first bad step and value are named."""
    watch = DivergenceWatch(num_steps=40, device=torch.device("cpu"))
    finite, loss = [torch.ones(3), torch.ones(2, 2)], torch.tensor(2.0)
    for step in range(40):
        tokens = torch.ones(5, dtype=torch.float64)  # a loss_fn may return any float dtype
        if step >= 22:
            tokens[3] = float("nan")
        weights = [torch.ones(3), torch.tensor([[1.0, -float("inf")], [0.0, 0.0]])] \
            if step >= 30 else finite
        draw = step % 2 == 0  # observable and tokens only at draws
        watch.record("a", step, loss if draw else None, tokens if draw else None, loss, finite)
        watch.record("b", step, None, None, loss, weights)
        if step == 15:
            assert watch.diverged(16) == []
    assert watch.diverged(40) == [("a", 22, "non-finite probe token losses"),
                                  ("b", 30, "non-finite weights")]
    assert watch.diverged(40) == []


class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _run_poisoned(poison, refuse_nonfinite=False, **changes):
    """Components ``a`` and ``b``; the minibatch loss of component ``name``'s chain 0 is NaN
    at its ``poison[name]``-th evaluation with grad (its step, until a step is re-run).
    ``refuse_nonfinite``: like a loss with argument validation, raise on non-finite
    weights."""
    calls = {}

    def loss_fn(m, batch):
        if refuse_nonfinite and not all(bool(torch.isfinite(p).all()) for p in m.parameters()):
            raise ValueError("non-finite weights reached the loss")
        losses = 0.5 * ((batch["y"] - m(batch["x"])) ** 2).sum(-1)
        moving = [n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad]
        if torch.is_grad_enabled() and len(moving) == 1:
            step = calls[moving[0]] = calls.get(moving[0], -1) + 1
            if poison.get(moving[0]) == step:
                losses = losses * float("nan")
        return losses

    generator = torch.Generator().manual_seed(1)
    data = {"x": torch.randn(32, 4, generator=generator),
            "y": torch.randn(32, 2, generator=generator)}
    probe = ProbeSet.from_batch({"x": torch.randn(5, 4, generator=generator),
                                 "y": torch.randn(5, 2, generator=generator)})
    config = SGLDConfig(**{**dict(num_chains=1, num_draws=40, batch_size=4,
                                  observable_sequences=4, step_size=1e-4, n_beta=1.0, gamma=1.0,
                                  progress=False, batch_chains="off"), **changes})
    components = [Component(n, {f"{n}.weight": None}) for n in ("a", "b")]
    return estimate_susceptibilities(_TwoLinear(), components, data, probe, config,
                                     loss_fn=loss_fn)


def test_the_earliest_divergence_is_reported_first():
    """Divergence flags are read every 16 steps; within one read, earliest step first."""
    with pytest.raises(ChainDivergedError, match="component 'b' diverged at step 3"):
        _run_poisoned({"a": 10, "b": 3})
    with pytest.warns(RuntimeWarning) as caught:
        result = _run_poisoned({"a": 10, "b": 3}, on_divergence="mark")
    messages = [str(w.message) for w in caught if "diverged" in str(w.message)]
    assert ["'b' diverged at step 3" in messages[0], "'a' diverged at step 10" in messages[1]] \
        == [True, True]
    assert list(result.failed) == ["b", "a"]
    # draws from the first bad step on are blanked (here one draw per step)
    for row, bad_step in ((1, 3), (0, 10)):
        trace = result.loss_traces[row, 0]
        assert np.isfinite(trace[:bad_step]).all() and np.isnan(trace[bad_step:]).all()


def test_a_diverged_chain_that_makes_the_loss_raise_is_dropped():
    """A chain evaluated with non-finite weights before its divergence is read back: the
    step is re-run without it, and the other component is kept."""
    with pytest.warns(RuntimeWarning, match="component 'a' diverged at step 0"):
        result = _run_poisoned({"a": 0}, refuse_nonfinite=True, on_divergence="mark")
    assert list(result.failed) == ["a"] and np.isfinite(result.chi[1]).all()



def test_chains_in_forked_workers_give_the_one_process_numbers(gpt2, probe, sampling_ids,
                                                               config):
    """Chain indices split over two forked processes (3 chains: 2 + 1), draws merged."""
    config = config.replace(num_chains=3)
    one = _estimate(gpt2, probe, sampling_ids, config.replace(workers=1), components="heads")
    two = _estimate(gpt2, probe, sampling_ids, config.replace(workers=2), components="heads")
    # the same chains; only float32 rounding may differ (threads per process differ)
    np.testing.assert_allclose(two.chi, one.chi, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(two.loss_traces, one.loss_traces, rtol=1e-5)
    np.testing.assert_allclose(two.full_loss_trace, one.full_loss_trace, rtol=1e-5)
    assert two.llc_full == pytest.approx(one.llc_full, rel=1e-5)


def test_a_divergence_in_a_worker_is_raised_or_marked_as_in_one_process():
    with pytest.raises(ChainDivergedError, match="chain 0 of component 'b' diverged at step 3"):
        _run_poisoned({"b": 3}, num_chains=2, workers=2)
    with pytest.warns(RuntimeWarning, match="component 'b' diverged at step 3"):
        result = _run_poisoned({"b": 3}, num_chains=2, workers=2, on_divergence="mark")
    assert list(result.failed) == ["b"] and np.isfinite(result.chi[0]).all()


def test_workers_only_where_forking_is_safe(gpt2, probe, sampling_ids, config):
    """With another thread running, explicit workers are refused and "auto" stays in this
    process (a loss_fn's side effects are then seen by the caller)."""
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        logits = m(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                               reduction="none")

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with pytest.raises(ValueError, match="workers=2 needs a CPU device on Linux"):
            _estimate(gpt2, probe, sampling_ids, config.replace(workers=2), loss_fn=loss_fn)
        torch.set_num_threads(2)  # "auto" would use 2 workers
        _estimate(gpt2, probe, sampling_ids, config, loss_fn=loss_fn)
    finally:
        torch.set_num_threads(1)
        stop.set()
        other.join()
    assert len(calls) > 0
