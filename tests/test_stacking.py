"""Stacked chains: the same numbers as one chain at a time, the check that guards it, and
the fallbacks (module types, batch contents, out-of-memory halving)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    NEEDS_CUDA,
    NEW_PRECISION_API,
    causal_token_losses,
    estimate,
    tiny_causal_lm,
    tiny_gpt2,
)

from susc_callback import (
    ProbeSet,
    estimate_susceptibilities,
    head_components,
)
from susc_callback.sampler.group import GroupLosses


@pytest.mark.parametrize(("model_type", "components", "device"), [
    ("gpt2", "heads,mlp", "cpu"), ("gpt2", "norms", "cpu"), ("llama", "heads,mlp", "cpu"),
    ("gpt_neox", "heads,mlp", "cpu"), ("gpt_neox", "layers", "cpu"),
    pytest.param("gpt2", "heads,mlp", "cuda", marks=NEEDS_CUDA)])
def test_stacked_chains_match_sequential(model_type, components, device, probe, sampling_ids,
                                         config):
    """A group's chains stacked into one batch (at most 3 chains per batch, forward passes
    sliced to 4 rows) give the one-at-a-time numbers: Linear, Conv1D and LayerNorm. On a
    GPU with TF32 allowed by the caller: the engine computes in true float32."""
    model = tiny_gpt2() if model_type == "gpt2" else tiny_causal_lm(model_type)
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
    sequential = estimate(model, probe, sampling_ids, config.replace(batch_chains="off"),
                           components=components)
    stacked = estimate(model, probe, sampling_ids,
                        config.replace(batch_chains="on", max_batched_chains=3,
                                       eval_batch_size=4), components=components)
    np.testing.assert_allclose(stacked.chi, sequential.chi, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(stacked.mean_phi, sequential.mean_phi, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(stacked.loss_traces, sequential.loss_traces, rtol=1e-5)


def test_stacking_a_group_of_one_and_a_group_without_restricted_chains(gpt2, probe,
                                                                       sampling_ids, config):
    """Heads of layer 1 only: the layer-0 group holds just the full chain."""
    heads = head_components(gpt2)[2:]
    on = estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="on"),
                   components=heads[:1])
    off = estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="off"),
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

    reference = estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="on"))
    monkeypatch.setattr(GroupLosses, "evaluate_stacked", small_device)
    with pytest.warns(RuntimeWarning, match="Out of memory with 2 chains"):
        split = estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="on"))
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


def _regressionestimate(model, config, batch_chains, *, components=None, batch=None,
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
    sequential = _regressionestimate(model, config, "off")
    auto = _regressionestimate(model, config, "auto")  # stacked when exact, else one by one
    assert checked == [[f"h{i}" for i in range(6)]]
    np.testing.assert_allclose(auto.chi, sequential.chi, rtol=1e-4, atol=1e-6)
    if misused:
        with pytest.raises(ValueError, match="'h5' differs from evaluating it alone.*"
                                             "batch_chains='off'"):
            _regressionestimate(model, config, "on")


def test_a_loss_coupling_samples_is_not_stacked(config, monkeypatch):
    """A loss that mixes the rows of a batch would mix the stacked chains' rows."""
    def coupled(m, batch):
        prediction = m(batch["x"])
        return (prediction - batch["y"]) ** 2 + prediction.mean()

    model = _LinearHeads(False)
    config = config.replace(eval_batch_size=32)  # 6 chains x 4 rows: "auto" stacks on a CPU
    checked = _spy_on_stacking_check(monkeypatch)
    sequential = _regressionestimate(model, config, "off", loss_fn=coupled)
    auto = _regressionestimate(model, config, "auto", loss_fn=coupled)
    assert len(checked) == 1  # "auto" checked, found the coupling and ran one by one
    np.testing.assert_allclose(auto.chi, sequential.chi, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="differs from evaluating it alone.*couple samples"):
        _regressionestimate(model, config, "on", loss_fn=coupled)


def test_an_instance_level_forward_wrapper_survives_stacking(config):
    """A wrapper installed on a module instance (as accelerate's hooks are) stays in force."""
    torch.manual_seed(0)
    model = _LinearHeads(False)
    unwrapped = model.heads[2].forward
    model.heads[2].forward = lambda x: unwrapped(x) * 2.0
    auto = _regressionestimate(model, config, "auto")
    reference = _regressionestimate(model, config, "off")
    np.testing.assert_allclose(auto.chi, reference.chi, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be stacked"):
        _regressionestimate(model, config, "on")


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
    off = _regressionestimate(model, config, "off", batch=examples, collate_fn=collate)
    auto = _regressionestimate(model, config, "auto", batch=examples, collate_fn=collate)
    np.testing.assert_allclose(auto.chi, off.chi, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="per-sample values that are not tensors"):
        _regressionestimate(model, config, "on", batch=examples, collate_fn=collate)


def test_a_loss_fn_whose_width_depends_on_the_batch_is_not_sliced(gpt2, sampling_ids, config):
    """Trimming padding shared by the batch changes K per slice: stacking (which slices
    probe chunks) falls back to one chain at a time, with the same numbers."""
    def loss_fn(m, batch):
        width = int(batch["attention_mask"].sum(1).max())
        ids, mask = batch["input_ids"][:, :width], batch["attention_mask"][:, :width]
        return causal_token_losses(m, ids, mask)

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
        estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="on"),
                  components=components)
    auto = estimate(gpt2, probe, sampling_ids, config, components=components)
    off = estimate(gpt2, probe, sampling_ids, config.replace(batch_chains="off"),
                    components=components)
    assert np.array_equal(auto.chi, off.chi)
