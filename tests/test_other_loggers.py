"""Figures and the token table reach the Trainer's W&B and MLflow integrations, in real
offline / local-file runs (skipped where the packages are not installed)."""

from __future__ import annotations

import pytest
from test_callback import make_callback, make_trainer


def test_wandb_offline_run_gets_the_figures(tmp_path, probe, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    trainer = make_trainer(tmp_path / "out", [make_callback(probe)], max_steps=4,
                           report_to="wandb")
    trainer.train()
    import wandb
    wandb.finish()
    media = list((tmp_path / "wandb").rglob("media/images/figures/heatmap_*.png"))
    assert len(media) == 2  # the snapshots at steps 2 and 4
    assert list((tmp_path / "wandb").rglob("media/html/tokens/top_*.html"))


def test_mlflow_run_gets_the_figures(tmp_path, probe, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    trainer = make_trainer(tmp_path / "out", [make_callback(probe)], max_steps=4,
                           report_to="mlflow")
    trainer.train()
    import mlflow
    mlflow.end_run()
    images = list((tmp_path / "mlruns").rglob("*figures_heatmap*"))
    assert images, sorted(str(p) for p in (tmp_path / "mlruns").rglob("*"))[:40]
    texts = list((tmp_path / "mlruns").rglob("tokens_top_step*.md"))
    assert len(texts) == 2 and "expresses" in texts[0].read_text()
