"""`calibrate` / `susc calibrate`: a sweep on the Gaussian linear-regression problem, whose
chains are exactly AR(1) processes, with a step size that is stable and ones that are not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cli import SGLD, write_jsonl
from test_closed_form import (
    COMPONENTS,
    D_IN,
    D_OUT,
    GAMMA,
    N_BETA,
    N,
    Problem,
    engine_inputs,
    loss_fn,
)

import susc_callback.cli as cli
from susc_callback import Component, SGLDConfig
from susc_callback.calibration import calibrate
from susc_callback.logging.calibration_figure import save_calibration_figure

pytestmark = pytest.mark.filterwarnings("ignore:.*diverged:RuntimeWarning")


@pytest.fixture(scope="module")
def problem():
    model, data, probe = engine_inputs(Problem())
    component = Component("a", {"weight": torch.tensor(COMPONENTS["a"].reshape(D_OUT, D_IN))})
    config = SGLDConfig(n_beta=N_BETA, gamma=GAMMA, num_chains=4, num_draws=500, seed=3,
                        batch_size=N, observable_sequences=N, eval_batch_size=N,
                        progress=False, workers=1)
    return model, data, probe, component, config


def test_the_stable_step_size_is_recommended(problem, tmp_path):
    """The update's largest contraction factor is |1 - eps lambda_max(A) / 2| with A =
    n_beta F + gamma I: beyond eps = 4 / lambda_max the chains explode. The smallest
    step size mixes slowly (small ESS); the middle one is the recommendation."""
    model, data, probe, component, config = problem
    lam = np.linalg.eigvalsh(N_BETA * Problem().L.F + GAMMA * np.eye(D_IN * D_OUT)).max()
    unstable = 5.0 / lam
    found = calibrate(model, data, probe, config, step_sizes=[1e-4, 1e-2, unstable],
                      n_betas=[N_BETA], components=[component], num_chains=2, num_draws=200,
                      loss_fn=loss_fn)
    slow, good, exploding = found.settings
    assert good.stationary and exploding.problems and "diverged" in exploding.problems[0]
    assert good.ess > slow.ess
    assert found.recommended.step_size == 1e-2
    assert found.recommended.num_chains == 4 and found.recommended.num_draws == 500
    assert "step_size=0.01" in found.reason
    folder = found.save(tmp_path)
    assert SGLDConfig.from_json(folder / "recommended_config.json") == \
        found.recommended.replace(progress=None, workers="auto")
    summary = json.loads((folder / "calibration.json").read_text())
    assert [s["stationary"] for s in summary["settings"]] == [s.stationary
                                                              for s in found.settings]
    assert save_calibration_figure(found, tmp_path / "traces.png").stat().st_size > 10_000


def test_no_stationary_setting_means_no_recommendation(problem):
    model, data, probe, component, config = problem
    found = calibrate(model, data, probe, config, step_sizes=[1.0], n_betas=[N_BETA],
                      components=[component], num_chains=2, num_draws=20, loss_fn=loss_fn)
    assert found.recommended is None and "No setting of the sweep is stationary" in found.reason
    assert "smaller step sizes" in found.reason  # it diverged


def test_bad_sweeps_are_named(problem):
    model, data, probe, component, config = problem
    with pytest.raises(ValueError, match="at least one value in step_sizes"):
        calibrate(model, data, probe, config, step_sizes=[], components=[component])
    with pytest.raises(ValueError, match="Invalid step_size: -1"):
        calibrate(model, data, probe, config, step_sizes=[-1.0], components=[component])


def test_the_command_writes_a_config_that_analyze_reads(tmp_path, capsys):
    from conftest import CONTEXT, VOCAB, tiny_gpt2

    checkpoint = tmp_path / "checkpoint-5"
    tiny_gpt2(0).save_pretrained(checkpoint)
    ids = torch.randint(0, VOCAB, (16, CONTEXT), generator=torch.Generator().manual_seed(0))
    data = write_jsonl(tmp_path / "train.jsonl", ids, ["train"] * 16)
    out = tmp_path / "calibration"
    code = cli.main(["calibrate", str(checkpoint), "--sampling-data", str(data), "--out",
                     str(out), "--step-sizes", "3e-4", "1e-3", "--n-betas", "10", "--draws",
                     "300", "--components", "mlp", *SGLD, "--gamma", "400"])
    printed = capsys.readouterr().out
    assert "eps=0.0003 n_beta=10 gamma=400" in printed and "eps=0.001 n_beta=10" in printed
    assert (out / "calibration_traces.png").exists()
    # this untrained model's chains mix slowly: at eps 3e-4 they disagree after 300 draws
    # (R-hat 1.41), at 1e-3 (eps gamma 0.4, the largest without step-size bias) they agree
    assert code == 0, printed
    config = SGLDConfig.from_json(out / "recommended_config.json")
    assert (config.n_beta, config.step_size, config.gamma) == (10, 1e-3, 400)
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.rename(run / "checkpoint-5")
    write_jsonl(tmp_path / "probe.jsonl", ids[:4], ["a"] * 4)
    assert cli.main(["analyze", str(run), "--probe", str(tmp_path / "probe.jsonl"),
                     "--sampling-data", str(data), "--config",
                     str(out / "recommended_config.json"), "--components", "mlp",
                     "--num-draws", "3", "--no-progress"]) == 0
    saved = json.loads((run / "susceptibility" / "step-5" / "meta.json").read_text())
    assert saved["config"]["step_size"] == config.step_size
