"""The report's summary, per-layer PCA, PC labels and training-loss figure."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import estimate

from susc_callback import SusceptibilityPCA
from susc_callback.analysis.pca import layer_pcas
from susc_callback.analysis.run_summary import summarize_run
from susc_callback.analysis.written_summary import written_summary
from susc_callback.logging.report import write_report
from susc_callback.logging.tensorboard import snapshot_scalars, variance_ranks
from susc_callback.store.run import training_losses


@pytest.fixture
def result(gpt2, probe, sampling_ids, config):
    return estimate(gpt2, probe, sampling_ids, config, step=5)


def test_layer_pcas_are_pcas_of_each_layers_heads(result):
    fits = layer_pcas(result, 2)
    assert sorted(fits) == ["l0h", "l1h"]
    for layer, names in (("l0h", ["l0h0", "l0h1"]), ("l1h", ["l1h0", "l1h1"])):
        direct = SusceptibilityPCA(2).fit(result.subset(names))
        np.testing.assert_allclose(fits[layer].loadings_, direct.loadings_)
        assert fits[layer].component_names_ == names


def test_aligned_pcs_carry_their_variance_rank(result):
    pca = SusceptibilityPCA(3).fit(result)
    pca.explained_variance_ratio_ = pca.explained_variance_ratio_[[2, 0, 1]]  # as if aligned
    assert variance_ranks(pca).tolist() == [3, 1, 2]
    scalars = snapshot_scalars(result, pca)
    assert [scalars[f"aligned_pc{k}/variance_rank"] for k in (1, 2, 3)] == [3, 1, 2]
    spectrum = [scalars[f"pc_spectrum/pc{k}"] for k in (1, 2, 3)]
    assert spectrum == sorted(spectrum, reverse=True)


def test_written_summary_states_the_rllc_and_its_standard_error(result):
    lines = written_summary(summarize_run([result]))
    low, high = int(np.argmin(result.rllc)), int(np.argmax(result.rllc))
    rllc = next(line for line in lines if line.startswith("rLLC"))
    assert f"{result.rllc[low]:.3g} ({result.component_names[low]})" in rllc
    assert f"{result.rllc[high]:.3g} ({result.component_names[high]})" in rllc
    assert f"standard error {result.rllc_se[low]:.2g} and {result.rllc_se[high]:.2g}" in rllc
    assert any(line.startswith("Layer l1h: a PCA of its 2 components") for line in lines)


def test_an_older_result_gets_the_between_chain_error(result):
    """Results saved before standard errors were stored: the chains' spread of E_C[phi]."""
    older = replace(result, rllc_se=None)
    rllc = next(line for line in written_summary(summarize_run([older]))
                if line.startswith("rLLC"))
    low, high = int(np.argmin(result.rllc)), int(np.argmax(result.rllc))
    phi = result.loss_traces - result.anchor_loss[:, None, None]  # (C, chains, draws)
    errors = result.config["n_beta"] * phi.mean(axis=2).std(axis=1, ddof=1) / np.sqrt(2)
    assert f"2 chains: {errors[low]:.2g} and {errors[high]:.2g}" in rllc


def test_training_loss_comes_from_the_latest_checkpoint(result, tmp_path):
    for step, losses in ((2, [3.0, 2.5]), (4, [3.0, 2.5, 2.2, 2.0])):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        history = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    steps, losses = training_losses(tmp_path)
    assert steps.tolist() == [1, 2, 3, 4] and losses.tolist() == [3.0, 2.5, 2.2, 2.0]
    assert training_losses(tmp_path / "nothing") is None
    page = write_report([result], tmp_path / "report", training_loss=(steps, losses))
    assert (tmp_path / "report" / "figures" / "training_loss.png").is_file()
    assert "Summary" in page.read_text()
