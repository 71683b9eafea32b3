"""Matplotlib figures of a result, its PCs and a run's trajectory.

Built with matplotlib's object-oriented API only (no pyplot), so making a figure never
changes the process's plotting backend or global figure registry.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

from susc_callback.analysis.pca import CommonBasisPCA, SusceptibilityPCA
from susc_callback.analysis.series import SnapshotSeries
from susc_callback.estimator.results import SusceptibilityResult

NEGATIVE_RGB, POSITIVE_RGB = (215, 48, 39), (26, 152, 80)
"""Red for negative (the component expresses the pattern), green for positive."""
SUSCEPTIBILITY_COLOURS = LinearSegmentedColormap.from_list(
    "susceptibility", [tuple(c / 255 for c in NEGATIVE_RGB), (1.0, 1.0, 1.0),
                       tuple(c / 255 for c in POSITIVE_RGB)])


def heatmap_figure(result: SusceptibilityResult) -> Figure:
    """Components x probe datasets: mean susceptibility, red < 0 (expresses), white 0,
    green > 0 (suppresses): the colours of the report's token view."""
    values = result.dataset_chi
    figure = Figure(figsize=(1.6 + 1.1 * len(result.dataset_names),
                             1.2 + 0.28 * len(result.component_names)), layout="constrained")
    axes = figure.add_subplot()
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    image = axes.imshow(values, aspect="auto", cmap=SUSCEPTIBILITY_COLOURS,
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
    figure = Figure(figsize=(max(5.5, 0.3 * len(names) + 1.5), 1.8 * count + 0.6),
                    layout="constrained")
    axes_list = figure.subplots(count, 1, sharex=True, squeeze=False)[:, 0]
    for k, axes in enumerate(axes_list):
        loadings = pca.loadings_[k]
        axes.bar(range(len(names)), loadings,
                 color=np.where(loadings < 0, "tab:red", "tab:green"))
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


def curves_figure(steps: np.ndarray, curves: dict[str, np.ndarray], title: str,
                  ylabel: str) -> Figure:
    """One line per named curve over training steps (log x axis when steps span decades)."""
    figure = Figure(figsize=(6.5, 3.8), layout="constrained")
    axes = figure.add_subplot()
    for name, values in curves.items():
        axes.plot(steps, values, marker="o", markersize=3, label=name)
    positive = steps[steps > 0]
    if len(positive) and positive.max() / positive.min() >= 20:  # log-spaced snapshots
        axes.set_xscale("symlog", linthresh=max(1.0, float(positive.min())))
    axes.set_xlabel("training step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if 0 < len(curves) <= 24:
        axes.legend(fontsize=7, ncols=2 if len(curves) > 8 else 1)
    return figure


def token_trajectory_figure(common: CommonBasisPCA, token_datasets: list[np.ndarray],
                            pcs: tuple[int, int] = (0, 1), colour_by: str = "step") -> Figure:
    """Every probe token of every snapshot in one plane of the common basis, coloured by
    training step or by dataset, with each dataset's mean path drawn over it."""
    a, b = pcs
    figure = Figure(figsize=(6.0, 5.0), layout="constrained")
    axes = figure.add_subplot()
    steps = np.array(common.steps_, dtype=float)
    if common.loadings_.shape[0] <= b:
        axes.set_title(f"fewer than {b + 1} PCs")
        return figure
    for i, scores in enumerate(common.token_scores_):
        if colour_by == "step":
            colours = np.full(len(scores), np.log1p(steps[i]))
            axes.scatter(scores[:, a], scores[:, b], c=colours, cmap="viridis", s=4,
                         alpha=0.35, vmin=np.log1p(steps.min()), vmax=np.log1p(steps.max()))
        else:
            axes.scatter(scores[:, a], scores[:, b], c=token_datasets[i], cmap="tab10", s=4,
                         alpha=0.35, vmin=0, vmax=9)
    for d, name in enumerate(common.dataset_names_):
        path = common.dataset_scores_[:, d]
        axes.plot(path[:, a], path[:, b], "-o", markersize=3, color="black", linewidth=1)
        axes.annotate(name, (path[-1, a], path[-1, b]), fontsize=8, xytext=(3, 3),
                      textcoords="offset points")
    axes.set_xlabel(f"PC{a + 1} ({100 * common.explained_variance_ratio_[a]:.1f}%)")
    axes.set_ylabel(f"PC{b + 1} ({100 * common.explained_variance_ratio_[b]:.1f}%)")
    what = "log step" if colour_by == "step" else "dataset"
    axes.set_title(f"Tokens in the common basis (colour: {what}; lines: dataset means)")
    return figure


def figure_to_array(figure: Figure, dpi: int = 100) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB rendering of ``figure``."""
    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _title(text: str, step: int | None) -> str:
    return text if step is None else f"{text}, step {step}"
