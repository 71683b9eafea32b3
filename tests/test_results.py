"""SusceptibilityResult save/load round trip and ProbeSet construction from texts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from susc_callback import ProbeSet, SGLDConfig, SusceptibilityResult, estimate_susceptibilities


def test_round_trip_is_exact(gpt2, probe, sampling_ids, config, tmp_path):
    result = estimate_susceptibilities(gpt2, None, sampling_ids, probe, config, step=120)
    result.chi[1] = np.nan
    result.failed["l0h1"] = "diverged"
    result.save(tmp_path / "step-120")
    loaded = SusceptibilityResult.load(tmp_path / "step-120")
    for name, value in vars(result).items():
        other = getattr(loaded, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and value.shape == other.shape, name
            assert np.array_equal(value, other, equal_nan=True), name
        else:
            assert value == other, name
    assert SGLDConfig.from_dict(loaded.config) == config
    meta = json.loads((tmp_path / "step-120" / "meta.json").read_text())
    assert meta["step"] == 120 and meta["component_names"][0] == "l0h0"


def test_load_rejects_a_folder_without_a_result(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved SusceptibilityResult"):
        SusceptibilityResult.load(tmp_path)


def test_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"Unknown SGLDConfig fields \['lr'\]"):
        SGLDConfig.from_dict({"lr": 1e-3})


def _word_tokenizer() -> PreTrainedTokenizerFast:
    words = "the cat sat on mat def return x".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_probe_from_texts_pads_masks_and_labels():
    tokenizer = _word_tokenizer()
    probe = ProbeSet.from_texts(["the cat sat on the mat", "def return x"], tokenizer,
                                datasets=["prose", "code"])
    assert probe.input_ids.tolist() == [[1, 2, 3, 4, 1, 5], [6, 7, 8, 0, 0, 0]]
    assert probe.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert probe.dataset_names == ["prose", "code"]
    truncated = ProbeSet.from_texts(["the cat sat on the mat"], tokenizer, max_length=3)
    assert truncated.input_ids.tolist() == [[1, 2, 3]]
    with pytest.raises(TypeError, match="list of texts"):
        ProbeSet.from_texts("the cat", tokenizer)


def test_result_maps_tokens_back_to_the_probe(gpt2, probe, sampling_ids, config):
    result = estimate_susceptibilities(gpt2, "layers", sampling_ids, probe, config)
    ids, mask = probe.input_ids, probe.attention_mask
    expected = [(s, t) for s in range(ids.shape[0]) for t in range(ids.shape[1] - 1)
                if mask[s, t] and mask[s, t + 1]]
    assert list(zip(result.token_sequence.tolist(), result.token_position.tolist())) == expected
    assert np.array_equal(result.target_token_ids,
                          np.array([int(ids[s, t + 1]) for s, t in expected]))
    labels = np.array(probe.datasets)[result.token_sequence]
    for d, name in enumerate(result.dataset_names):
        np.testing.assert_allclose(result.dataset_chi[:, d], result.chi[:, labels == name].mean(1))
    assert torch.equal(torch.as_tensor(result.probe_input_ids), ids)


def test_subset_and_merge_take_rows_by_component(gpt2, probe, sampling_ids, config):
    from susc_callback.estimator.results import merge_results

    result = estimate_susceptibilities(gpt2, None, sampling_ids, probe, config)
    result.chi[2] = np.nan
    result.failed["l1h0"] = "diverged"
    layer1 = result.subset(["l1h1", "l1h0"])
    assert layer1.component_names == ["l1h1", "l1h0"] and layer1.failed == {"l1h0": "diverged"}
    for key in ("chi", "dataset_chi", "rllc", "mean_phi", "anchor_loss", "loss_traces"):
        assert np.array_equal(getattr(layer1, key), getattr(result, key)[[3, 2]],
                              equal_nan=True), key
    assert list(layer1.finite_components) == [True, False]
    merged = merge_results([result.subset(["l0h1", "l1h0"]), result.subset(["l1h1", "l0h0"])],
                           result.component_names)
    assert np.array_equal(merged.chi, result.chi, equal_nan=True)
    with pytest.raises(ValueError, match="Unknown components \\['l9h9'\\]"):
        result.subset(["l9h9"])
