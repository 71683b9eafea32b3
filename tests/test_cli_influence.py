"""``susc influence`` on a checkpoint series made in the test, and the report's section."""

from __future__ import annotations

import numpy as np
import pytest
from test_cli import SGLD, analyze, run  # noqa: F401 - the run fixture

import susc_callback.cli as cli
from susc_callback.influence import InfluenceResult
from susc_callback.influence.views import influence_dynamics, influential_sequences
from susc_callback.store.run import INFLUENCE_FOLDER, RunStore


def influence(run_dir, *extra):
    root = run_dir.parent
    return cli.main(["influence", str(run_dir), "--train", str(root / "train.jsonl"),
                     "--queries", str(root / "probe.jsonl"), *SGLD, *extra])


def test_influence_of_a_series_is_saved_reported_and_resumed(run, capsys):  # noqa: F811
    assert influence(run, "--top", "3") == 0
    store = RunStore.of_run(run, INFLUENCE_FOLDER, InfluenceResult)
    results = store.load_all()
    assert [r.step for r in results] == [10, 20, 30]
    assert results[0].influence.shape == (1, 16, 4) and results[0].extra["train_texts"]
    page = (store.root / "report.html").read_text()
    latest = results[-1]
    found = influential_sequences(latest, 0, 3)
    for sequence, score in found.raising + found.lowering:
        assert f"<b>{score:+.3g}</b> #{sequence} " in page
    assert (store.root / "figures" / "influence_query0.png").is_file()
    dynamics = influence_dynamics(results, 0, 3)
    assert dynamics.scores.shape == (3, len(dynamics.sequences))
    np.testing.assert_array_equal(dynamics.scores[-1], latest.influence[
        0][dynamics.sequences, 0])  # sequence rows: the stored matrix itself
    capsys.readouterr()
    assert influence(run) == 0  # resumed: nothing computed again
    assert capsys.readouterr().out.count("done already") == 3
    assert influence(run, "--n-beta", "20") == 2  # other settings are refused by name
    assert "n_beta=10.0 (now 20.0)" in capsys.readouterr().err


def test_the_report_shows_the_runs_influence(run, tmp_path):  # noqa: F811
    assert analyze(run) == 0 and influence(run) == 0
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Influence (Bayesian influence functions) at step 30" in page


@pytest.mark.parametrize("flags, message", [
    (["--train-level", "word"], "invalid choice: 'word'"),
    (["--components", "l9h9"], "Unknown component 'l9h9'"),
])
def test_bad_influence_flags_are_named(run, capsys, flags, message):  # noqa: F811
    try:
        code = influence(run, *flags)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err
