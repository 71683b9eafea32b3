"""Matplotlib figures of a result, its PCs and a run's trajectory.

Built with matplotlib's object-oriented API only (no pyplot), so making a figure never
changes the process's plotting backend or global figure registry.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from susc_callback.analysis import SusceptibilityPCA
from susc_callback.results import SusceptibilityResult
from susc_callback.series import SnapshotSeries


def heatmap_figure(result: SusceptibilityResult) -> Figure:
    """Components x probe datasets: mean susceptibility, red < 0 (expresses) < blue."""
    values = result.dataset_chi
    figure = Figure(figsize=(1.6 + 1.1 * len(result.dataset_names),
                             1.2 + 0.28 * len(result.component_names)), layout="constrained")
    axes = figure.add_subplot()
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    image = axes.imshow(values, aspect="auto", cmap="RdBu",
                        norm=TwoSlopeNorm(0.0, -limit or -1.0, limit or 1.0))
    axes.set_xticks(range(len(result.dataset_names)), result.dataset_names, rotation=30,
                    ha="right")
    axes.set_yticks(range(len(result.component_names)), result.component_names)
    axes.set_title(_title("Susceptibility per dataset", result.step))
    figure.colorbar(image, ax=axes, label="chi (< 0: expresses)")
    return figure


def loadings_figure(pca: SusceptibilityPCA, step: int | None = None) -> Figure:
    """One bar chart per PC: every component's loading, with the explained variance."""
    count = len(pca.loadings_)
    names = pca.component_names_
    figure = Figure(figsize=(max(4.0, 0.3 * len(names) + 1.5), 1.8 * count + 0.6),
                    layout="constrained")
    axes_list = figure.subplots(count, 1, sharex=True, squeeze=False)[:, 0]
    for k, axes in enumerate(axes_list):
        loadings = pca.loadings_[k]
        axes.bar(range(len(names)), loadings,
                 color=np.where(loadings < 0, "tab:red", "tab:blue"))
        axes.axhline(0.0, color="black", linewidth=0.6)
        axes.set_ylabel(f"PC{k + 1}\n{100 * pca.explained_variance_ratio_[k]:.1f}%")
    axes_list[-1].set_xticks(range(len(names)), names, rotation=90)
    axes_list[0].set_title(_title(f"PC loadings ({pca.standardization})", step))
    return figure


def trajectory_figure(series: SnapshotSeries, pcs: tuple[int, int] = (0, 1)) -> Figure:
    """Each probe dataset's mean score in the plane of two aligned PCs, over snapshots."""
    steps, names, scores = series.dataset_trajectories()
    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    a, b = pcs
    for d, name in enumerate(names):
        if scores.shape[2] <= b:
            break
        line = axes.plot(scores[:, d, a], scores[:, d, b], "-", alpha=0.6, label=name)[0]
        axes.scatter(scores[:, d, a], scores[:, d, b], c=np.log1p(steps), cmap="viridis",
                     edgecolors=line.get_color(), s=28, zorder=3)
        axes.annotate(f"{name} @ {steps[-1]}", (scores[-1, d, a], scores[-1, d, b]),
                      fontsize=8, xytext=(3, 3), textcoords="offset points")
    axes.axhline(0.0, color="grey", linewidth=0.5)
    axes.axvline(0.0, color="grey", linewidth=0.5)
    axes.set_xlabel(f"PC{a + 1}")
    axes.set_ylabel(f"PC{b + 1}")
    axes.set_title("Probe datasets over training (colour: log step)")
    if names:
        axes.legend(fontsize=8)
    return figure


def figure_to_array(figure: Figure, dpi: int = 100) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB rendering of ``figure``."""
    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _title(text: str, step: int | None) -> str:
    return text if step is None else f"{text}, step {step}"
