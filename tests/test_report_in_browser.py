"""The report in headless Chromium (where Chromium and Playwright are installed: Debian's
``chromium`` and ``pip install playwright``; skipped otherwise): it opens from disk, and a
cluster's outline button marks exactly that cluster's tokens in the per-token view."""

from __future__ import annotations

import shutil

import pytest
from test_cli import analyze, run  # noqa: F401 - the run fixture

import susc_callback.cli as cli
from susc_callback.clusters.snapshot import cluster_snapshot
from susc_callback.store.run import load_results

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium executable")
def test_outlining_a_cluster_marks_its_tokens(run, tmp_path):  # noqa: F811
    playwright = pytest.importorskip("playwright.sync_api")
    assert analyze(run) == 0
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    clusters = cluster_snapshot(load_results(run)[-1]).clusters
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((tmp_path / "report" / "report.html").as_uri())
        for k in range(clusters.n_clusters_):
            page.click(f"button.cluster[data-cluster='{k}']")
            outlined = page.eval_on_selector_all(
                ".tok.outlined", "spans => spans.map(s => Number(s.dataset.token))")
            assert sorted(outlined) == [i for i, label in enumerate(clusters.labels_)
                                        if label == k]
        page.click(f"button.cluster[data-cluster='{clusters.n_clusters_ - 1}']")  # off again
        assert page.locator(".tok.outlined").count() == 0
        browser.close()
    assert errors == []
