"""Engine behaviour: agreement with a brute-force loop, isolation from the caller,
restriction, seeding, prefix replay, input errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import (
    DEVICES,
    NEW_PRECISION_API,
    causal_lm_loss,
    estimate,
    reference_draws,
    tiny_causal_lm,
    tiny_gpt2,
)

from susc_callback import (
    ChainDivergedError,
    Component,
    ProbeSet,
    SGLDConfig,
    estimate_susceptibilities,
    head_components,
)
from susc_callback.components.resolve import resolve_components
from susc_callback.estimator.observable import finite_set_kappa
from susc_callback.sampler.group import GroupLosses
from susc_callback.sampler.prefix import PrefixReplay


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("observable", ["fixed", "per-block"])
def test_engine_matches_brute_force_reference(gpt2, probe, sampling_ids, config, device,
                                              observable):
    """Prefix replay, lockstep groups and pruned backward give the plain loop's numbers;
    so does measuring each block's L on its own observable set. The finite-set correction
    of E[phi L]: over pairs of distinct sequences, for m of N sampling sequences,
    E[phi L] + kappa (E[phi L] - E[diagonal]) with kappa = (N - m) / (N (m - 1))."""
    config = config.replace(device=device, observable=observable)
    heads = head_components(gpt2)
    chosen = [heads[0], heads[3]]  # one head in each layer: prefix depth 0 and 1
    result = estimate(gpt2, probe, sampling_ids, config, components=chosen)
    full_masks = {name: None for name, _ in gpt2.named_parameters()}
    full = reference_draws(gpt2, full_masks, sampling_ids, probe, config, "full", device)
    e_full = torch.stack([lx - L for _, L, lx, _ in full]).mean(0)
    m, n = config.observable_sequences, len(sampling_ids)
    kappa = (n - m) / (n * (m - 1))
    for row, component in enumerate(chosen):
        draws = reference_draws(gpt2, component.masks, sampling_ids, probe, config,
                                component.name, device)
        phi = torch.stack([phi for phi, _, _, _ in draws])
        loss = torch.stack([L for _, L, _, _ in draws])
        diagonal = torch.stack([d for _, _, _, d in draws])
        delta = torch.stack([lx - L for _, L, lx, _ in draws])
        correction = kappa * ((phi * loss).mean() - diagonal.mean())
        chi = -((phi[:, None] * delta).mean(0) - phi.mean() * e_full) + correction
        # Losses (~4 nats) are float32: one ulp is 4.8e-7, and the two implementations sum
        # tokens in different orders, so phi and chi agree to a few ulps, not bitwise.
        np.testing.assert_allclose(result.chi[row], chi.numpy(), rtol=1e-4, atol=2e-6)
        # the test sees the correction (a uniform shift): the engine is nearer to chi than
        # half of it
        assert np.abs(result.chi[row] - chi.numpy()).max() < abs(float(correction)) / 2
        np.testing.assert_allclose(result.mean_phi[row], phi.mean().item(), rtol=1e-4, atol=2e-6)
        # The covariance part, -Cov_C(phi, l_x - L) with the 1/n (population) normalisation,
        # and the baseline correction that makes up the rest of chi.
        covariance = -((phi[:, None] * delta).mean(0) - phi.mean() * delta.mean(0)) \
            + correction
        np.testing.assert_allclose(result.chi_covariance[row], covariance.numpy(), rtol=1e-4,
                                   atol=2e-6)
        baseline = -phi.mean() * (delta.mean(0) - e_full)
        np.testing.assert_allclose(result.chi[row] - result.chi_covariance[row],
                                   baseline.numpy(), rtol=1e-3, atol=4e-6)


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
    estimate(model, probe, sampling_ids, config)
    _assert_same_state(before, _model_state(model))
    _assert_same_rng(rng, _rng_state())


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
        return causal_lm_loss(m, batch)

    saved = (backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision)
    try:
        if allow.startswith("tf32"):
            backends.cuda.matmul.fp32_precision = "tf32"
        else:
            torch.set_float32_matmul_precision("medium")
        before = (backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision)
        estimate(gpt2, probe, sampling_ids, config, loss_fn=loss_fn)
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
        estimate(model, probe, sampling_ids, config.replace(step_size=1e6, gamma=0.0))
    _assert_same_state(before, _model_state(model))
    _assert_same_rng(rng, _rng_state())


def test_samples_float32_in_eval_mode(probe, sampling_ids, config):
    model = tiny_gpt2(resid_pdrop=0.5).to(torch.bfloat16).train()
    seen = []

    def loss_fn(m, batch):
        seen.append((m.training, next(m.parameters()).dtype))
        return causal_lm_loss(m, batch)

    estimate(model, probe, sampling_ids, config, loss_fn=loss_fn)
    assert seen and all(mode == (False, torch.float32) for mode in seen)
    assert model.training and next(model.parameters()).dtype == torch.bfloat16


def test_restricted_chain_moves_exactly_its_entries(gpt2, probe, sampling_ids, config):
    """Every forward pass sees w* outside the component's mask and moved entries inside it."""
    mask = torch.zeros_like(gpt2.transformer.h[1].attn.c_attn.weight, dtype=torch.bool)
    mask[3:7, 5:20] = True
    component = Component("patch", {"transformer.h.1.attn.c_attn.weight": mask})
    start = {k: v.detach().clone() for k, v in gpt2.named_parameters()}
    snapshots = []

    def loss_fn(m, batch):
        snapshots.append({k: v.detach().clone() for k, v in m.named_parameters()})
        return causal_lm_loss(m, batch)

    estimate(gpt2, probe, sampling_ids, config, components=[component], loss_fn=loss_fn)
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


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_seed_reproduces_and_components_are_independent(gpt2, probe, sampling_ids,
                                                              config, device):
    gpt2.to(device)
    heads = head_components(gpt2)
    together = estimate(gpt2, probe, sampling_ids, config, components=heads)
    again = estimate(gpt2, probe, sampling_ids, config, components=heads)
    assert np.array_equal(together.chi, again.chi)
    # Same random streams whatever runs beside a component; run alone it is evaluated one
    # chain at a time rather than stacked, so only float rounding may differ.
    reversed_run = estimate(gpt2, probe, sampling_ids, config, components=heads[::-1])
    alone = estimate(gpt2, probe, sampling_ids, config, components=[heads[2]])
    np.testing.assert_allclose(reversed_run.chi[::-1], together.chi, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(alone.chi[0], together.chi[2], rtol=1e-5, atol=1e-7)
    other_seed = estimate(gpt2, probe, sampling_ids, config.replace(seed=1), components=heads)
    assert not np.array_equal(other_seed.chi, together.chi)


def test_phi_is_zero_at_the_checkpoint(gpt2, probe, sampling_ids, config):
    """The first draw (no burn-in) is w* itself, so L equals the anchor exactly (of the
    one fixed set; per-block sets: see the brute-force test)."""
    result = estimate(gpt2, probe, sampling_ids, config.replace(observable="fixed"))
    assert np.array_equal(result.loss_traces[:, :, 0],
                          np.broadcast_to(result.anchor_loss[:, None], (4, 2)))
    # every chain's first draw is at w*: the same probe losses
    assert (result.probe_traces[:, :, 0] == result.full_probe_trace[0, 0]).all()


def test_per_block_observable_sets_differ_and_are_anchored_on_themselves(
        gpt2, probe, sampling_ids, config):
    """Each chain's first draw is w*, so its L is its own set's L(w*), which differs from
    chain to chain; the component's chains do not depend on which other components run
    beside it."""
    config = config.replace(observable="per-block")
    heads = head_components(gpt2)
    result = estimate(gpt2, probe, sampling_ids, config, components=heads)
    first_losses = result.loss_traces[:, :, 0]  # L(w*) of each chain's first set
    assert (first_losses[:, 0] != first_losses[:, 1]).all()
    np.testing.assert_array_equal(first_losses, first_losses[:1].repeat(len(heads), 0))
    alone = estimate(gpt2, probe, sampling_ids, config, components=[heads[1]])
    np.testing.assert_allclose(alone.chi[0], result.chi[1], rtol=1e-5, atol=1e-7)


def test_separate_batch_anchor_offsets_phi(gpt2, probe, sampling_ids, config):
    result = estimate(gpt2, probe, sampling_ids, config.replace(anchor="separate-batches",
                                                                 observable="fixed"))
    assert not np.allclose(result.loss_traces[:, :, 0], result.anchor_loss[:, None])


def test_minibatch_observable(gpt2, probe, sampling_ids, config):
    result = estimate(gpt2, probe, sampling_ids, config.replace(observable="minibatch"))
    assert np.isfinite(result.chi).all()
    assert np.array_equal(result.loss_traces[:, :, 0], result.loss_traces[:, :, 0])


def test_too_little_sampling_data(gpt2, probe, sampling_ids, config):
    with pytest.raises(ValueError, match="fewer than batch_size = 30"):
        estimate(gpt2, probe, sampling_ids, config.replace(batch_size=30))


def test_bad_loss_fn_output(gpt2, probe, sampling_ids, config):
    with pytest.raises(ValueError, match="loss_fn must return"):
        estimate(gpt2, probe, sampling_ids, config,
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


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gpt_neox"])
def test_prefix_replay_matches_full_forward(model_type, probe, sampling_ids, config,
                                            monkeypatch):
    """Replaying frozen blocks changes no number: same result with replay switched off."""
    model = tiny_causal_lm(model_type)
    components = "heads,mlp,unembedding"
    replayed = estimate(model, probe, sampling_ids, config, components=components)
    real = PrefixReplay.frozen_blocks  # every parameter used before any block: no replay
    monkeypatch.setattr(PrefixReplay, "frozen_blocks",
                        lambda prefix, run: dict.fromkeys(real(prefix, run), 0))
    recomputed = estimate(model, probe, sampling_ids, config, components=components)
    assert replayed.component_names == recomputed.component_names
    np.testing.assert_allclose(replayed.chi, recomputed.chi, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(replayed.rllc, recomputed.rllc, rtol=1e-4, atol=1e-8)


def test_progress_bar_only_when_asked(gpt2, probe, sampling_ids, config, capsys):
    estimate(gpt2, probe, sampling_ids, config.replace(progress=True))
    assert "SGLD" in capsys.readouterr().err
    estimate(gpt2, probe, sampling_ids, config.replace(progress=None))  # stderr not a tty
    assert "SGLD" not in capsys.readouterr().err


def test_inputs_that_do_not_fit_the_model_are_named(gpt2, sampling_ids, config):
    too_long = ProbeSet.from_tensors(torch.zeros(2, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="probe sequences have 40 tokens, more than the "
                                         "model's context of 16"):
        estimate(gpt2, too_long, sampling_ids, config)
    out_of_vocab = ProbeSet.from_tensors(torch.full((2, 8), 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids in \[64, 64\], outside the model's "
                                         r"vocabulary \[0, 63\]"):
        estimate(gpt2, out_of_vocab, sampling_ids, config)
    probe = ProbeSet.from_tensors(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sampling_data holds token ids"):
        estimate(gpt2, probe, sampling_ids + 64, config)


def test_runs_inside_no_grad_and_inference_mode(gpt2, probe, sampling_ids, config):
    reference = estimate(gpt2, probe, sampling_ids, config)
    with torch.no_grad():
        quiet = estimate(gpt2, probe, sampling_ids, config)
    with torch.inference_mode():
        inference = estimate(gpt2, probe, sampling_ids, config)
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
    result = estimate(gpt2, probe, sampling_ids.int(), config, components="layers")
    assert np.isfinite(result.chi).all()
    examples = [{"input_ids": row.tolist()} for row in sampling_ids]
    with pytest.raises(ValueError, match="with_format\\('torch'\\)"):
        estimate(gpt2, probe, examples, config, collate_fn=lambda rows: {
            "input_ids": [r["input_ids"] for r in rows]})


def test_loss_fn_mask_of_the_wrong_shape(gpt2, probe, sampling_ids, config):
    def loss_fn(m, batch):
        losses = torch.ones(batch["input_ids"].shape, requires_grad=True)
        return losses, torch.ones(len(losses), dtype=torch.bool)

    pattern = r"validity mask of shape \(3,\) for losses of shape \(3, 16\)"
    with pytest.raises(ValueError, match=pattern):
        estimate(gpt2, probe, sampling_ids, config, loss_fn=loss_fn)


@pytest.mark.parametrize("batch_chains", ["off", "on"])
def test_a_loss_fn_with_the_wrong_number_of_losses_is_named(gpt2, probe, sampling_ids,
                                                            config, batch_chains):
    def loss_fn(m, batch):
        losses = causal_lm_loss(m, batch).flatten()
        return losses[losses > 0][:4]  # not one loss per sample

    with pytest.raises(ValueError, match="loss_fn returned 4 per-sample losses for a batch "
                                         "of \\d+ samples"):
        estimate(gpt2, probe, sampling_ids, config.replace(batch_chains=batch_chains),
                  loss_fn=loss_fn)


def test_first_draw_at_the_checkpoint_is_evaluated_once(gpt2, probe, sampling_ids, config,
                                                        monkeypatch):
    """Without burn-in every chain's first draw is at w*: the probe is evaluated there once
    per estimate, not once per chain (chains run in prefix groups of depth 0 and 1)."""

    calls = []  # one depth per chain evaluated
    real = GroupLosses.probe_losses

    def counted(self, stack=None):
        calls.extend([self.depth] * (1 if stack is None else stack.count))
        return real(self, stack)

    monkeypatch.setattr(GroupLosses, "probe_losses", counted)
    result = estimate(gpt2, probe, sampling_ids, config)
    chain_draws = (len(result.component_names) + 1) * config.num_chains * config.num_draws
    checkpoint_draws = (len(result.component_names) + 1) * config.num_chains
    assert len(calls) == chain_draws - checkpoint_draws + 1
    assert sorted(set(calls)) == [0, 1]
    moved = estimate(gpt2, probe, sampling_ids, config.replace(num_burnin=1))
    at_anchor = np.broadcast_to(moved.anchor_loss[:, None], moved.loss_traces.shape[:2])
    assert not np.array_equal(moved.loss_traces[:, :, 0], at_anchor)  # burn-in: not shared


def test_finite_set_kappa():
    """(N - m) / (N (m - 1)); nothing to correct with the whole data, one sequence, a
    minibatch observable or the correction off."""
    config = SGLDConfig(observable_sequences=10)
    assert finite_set_kappa(config, 40) == pytest.approx(30 / 360)
    assert finite_set_kappa(config, 10) == 0
    assert finite_set_kappa(config.replace(observable_sequences=1), 40) == 0
    assert finite_set_kappa(config.replace(observable="minibatch"), 40) == 0
    assert finite_set_kappa(config.replace(unbiased_observable=False), 40) == 0
