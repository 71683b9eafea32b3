"""Inputs that cannot define an estimate are refused before sampling, with an error that
names the value and what would be valid; inputs that leave only a part undefined warn and
name the part. Nothing comes back as silent zeros or NaN."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import CONTEXT, VOCAB, estimate, tiny_gpt2
from torch import nn

from susc_callback import ProbeSet, SGLDConfig
from susc_callback.analysis.pca import ConstantMatrixError, SusceptibilityPCA
from susc_callback.analysis.series import SnapshotSeries
from susc_callback.callback.schedule import Schedule
from susc_callback.sampler.divergence import ChainDivergedError


@pytest.mark.parametrize("change, message", [
    ({"step_size": -1.0}, "step_size: -1.0"),
    ({"n_beta": float("nan")}, "n_beta"),
    ({"n_beta": True}, "n_beta: True"),
    ({"gamma": -2.0}, "gamma: -2.0"),
    ({"gamma": "1"}, "gamma: '1'"),
    ({"num_draws": 0}, "num_draws: 0"),
    ({"num_chains": 2.0}, "num_chains: 2.0"),
    ({"batch_size": True}, "batch_size: True"),
    ({"seed": 1.0}, "seed: 1.0"),
    ({"seed": -1}, "seed: -1"),
    ({"workers": 0}, "workers: 0"),
    ({"device": 123}, "device: 123"),
    ({"device": "gpu"}, "device: 'gpu'"),
    ({"progress": 1}, "progress: 1"),
    ({"num_draws": 1, "num_burnin": 0}, "num_draws=1 with num_burnin=0"),
    ({"num_chains": 1, "num_draws": 1, "num_burnin": 5}, "at least 2 draws"),
    ({"observable": "batch"}, "observable: 'batch'"),
    ({"anchor": "devinterp"}, "anchor: 'devinterp'"),
    ({"unbiased_observable": "yes"}, "unbiased_observable: 'yes'"),
    ({"steps_between_draws": 0}, "steps_between_draws: 0"),
    ({"anchor": "separate-batches"}, "observable='fixed' for one observable set"),
])
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        SGLDConfig(**change)


def test_config_normalises_integers_and_devices():
    config = SGLDConfig(seed=np.int64(3), num_chains=np.int32(2), device=torch.device("cpu"))
    assert type(config.seed) is int and type(config.num_chains) is int
    assert config == SGLDConfig(seed=3, num_chains=2, device="cpu")
    assert SGLDConfig(seed=np.int64(3)).to_dict() == SGLDConfig(seed=3).to_dict()


def test_all_masked_sampling_data_is_refused(gpt2, probe, sampling_ids, config):
    data = {"input_ids": sampling_ids, "attention_mask": torch.zeros_like(sampling_ids)}
    with pytest.raises(ValueError, match="sampling_data has no valid target token"):
        estimate(gpt2, probe, data, config)


def test_partly_empty_sampling_data_warns(gpt2, probe, sampling_ids, config):
    mask = torch.ones_like(sampling_ids)
    mask[:3, 1:] = 0  # three sequences with one real token: no target
    with pytest.warns(UserWarning, match="3 of 24 sampling_data sequences"):
        result = estimate(gpt2, probe, {"input_ids": sampling_ids, "attention_mask": mask},
                          config)
    assert np.isfinite(result.chi).all()


def test_minibatch_without_valid_entries_is_not_a_zero_gradient(gpt2, probe, sampling_ids,
                                                                  config):
    """A custom loss that marks every entry of the SGLD minibatches invalid: the chains
    report it (step 0, with the hint that no step size helps), never a zero gradient."""
    def loss_fn(model, batch):
        losses, valid = _default_losses(model, batch)
        minibatch = "sampling" in batch and len(batch["input_ids"]) == config.batch_size
        return losses, valid & ~minibatch
    data = {"input_ids": sampling_ids, "sampling": torch.ones(len(sampling_ids))}
    cfg = config.replace(eval_batch_size=5, observable_sequences=5, on_divergence="raise")
    with pytest.raises(ChainDivergedError, match="step 0.*no valid target token"):
        estimate(gpt2, probe, data, cfg, loss_fn=loss_fn)


def _default_losses(model, batch):
    from susc_callback.data.sampling import causal_lm_token_losses

    return causal_lm_token_losses(model, batch)


def test_observable_without_valid_tokens_is_refused(gpt2, probe, sampling_ids, config):
    def loss_fn(model, batch):
        losses, valid = _default_losses(model, batch)
        observable = "sampling" in batch and len(batch["input_ids"]) != config.batch_size
        return losses, valid & ~observable
    data = {"input_ids": sampling_ids, "sampling": torch.ones(len(sampling_ids))}
    with pytest.raises(ValueError, match="observable loss.* at the checkpoint"):
        estimate(gpt2, probe, data, config.replace(eval_batch_size=5, observable_sequences=5),
                 loss_fn=loss_fn)


def test_non_finite_checkpoint_is_refused_before_sampling(probe, sampling_ids, config):
    model = tiny_gpt2().eval()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite .* before any SGLD step"):
        estimate(model, probe, sampling_ids, config)


def test_probe_dataset_without_tokens_warns_and_is_nan(gpt2, sampling_ids, config):
    ids = torch.randint(0, VOCAB, (4, CONTEXT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2:, 1:] = 0
    probe = ProbeSet.from_tensors(ids, mask, datasets=["kept", "kept", "empty", "empty"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "Mean of empty slice"
        with pytest.warns(UserWarning, match=r"\['empty'\] have no valid tokens"):
            result = estimate(gpt2, probe, sampling_ids, config)
        pca = SusceptibilityPCA(2).fit(result)
    empty = result.dataset_names.index("empty")
    assert np.isnan(result.dataset_chi[:, empty]).all()
    assert np.isfinite(np.delete(result.dataset_chi, empty, axis=1)).all()
    assert np.isnan(pca.dataset_scores_[empty]).all()


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1.7, 2.2, 3.0]]), "integer token ids, got torch.float32"),
    (torch.tensor([[True, False, True]]), "integer token ids, got torch.bool"),
])
def test_probe_refuses_non_integer_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        ProbeSet.from_tensors(ids)


def test_probe_refuses_non_binary_mask():
    with pytest.raises(ValueError, match="only 0 and 1"):
        ProbeSet.from_tensors(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 0.5, 1]]))


def test_masked_lm_with_default_loss_is_refused(probe, sampling_ids, config):
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32)).eval()
    with pytest.raises(ValueError, match="BertForMaskedLM is not a causal language model.*"
                                         "loss_fn="):
        estimate(model, probe, sampling_ids, config, components={"all": {
            "bert.embeddings.word_embeddings.weight": None}})


def test_module_without_input_ids_and_default_loss_is_refused(probe, sampling_ids, config):
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB))
    with pytest.raises(ValueError, match=r"Sequential\.forward\(input\) cannot take; pass "
                                         "loss_fn="):
        estimate(model, probe, sampling_ids, config, components={"all": {"0.weight": None}})


def test_meta_device_model_is_refused(probe, sampling_ids, config):
    with torch.device("meta"):
        model = tiny_gpt2()
    with pytest.raises(ValueError, match="'meta' device .* load the weights"):
        estimate(model, probe, sampling_ids, config.replace(device="cpu"))


def test_constant_matrix_has_no_pcs(gpt2, probe, sampling_ids, config):
    result = estimate(gpt2, probe, sampling_ids, config)
    result.chi[:] = 0.0
    with pytest.raises(ConstantMatrixError, match="constant"):
        SusceptibilityPCA(2).fit(result)
    result.step = 5
    with pytest.warns(UserWarning, match="step 5 has no PCs"):
        assert SnapshotSeries(2).add(result) is None


def test_on_save_schedule_without_saves():
    with pytest.warns(UserWarning, match="save_strategy='no' takes no snapshot"):
        Schedule(every=5, on_save=True).check(20, saves=False)
    with pytest.raises(ValueError, match="which saves no checkpoint"):
        Schedule(on_save=True).check(20, saves=False)


def test_progress_lines_for_logs(gpt2, probe, sampling_ids, config, capsys, monkeypatch):
    from susc_callback.estimator import progress

    monkeypatch.setattr(progress, "LINE_EVERY_SECONDS", 0.0)
    estimate(gpt2, probe, sampling_ids, config.replace(progress="lines"))
    lines = capsys.readouterr().err.strip().splitlines()
    total = 5 * config.num_chains * config.num_steps  # 4 heads and the full chain
    assert len(lines) > 1 and all(line.startswith("SGLD: ") and "\r" not in line
                                  for line in lines)
    assert lines[-1].startswith(f"SGLD: {total}/{total} chain steps (100 %)")
