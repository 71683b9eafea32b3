"""Matplotlib figures of a result, its PCs and a run's trajectory.

Built with matplotlib's object-oriented API only (no pyplot), so making a figure never
changes the process's plotting backend or global figure registry.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

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
    if result.dataset_chi_se is not None:  # a cell whose mean is within 2 SE of 0: hatched
        for (row, column), error in np.ndenumerate(result.dataset_chi_se):
            if np.isfinite(error) and abs(values[row, column]) < 2 * error:
                axes.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False,
                                         hatch="///", edgecolor="grey", linewidth=0))
        axes.set_xlabel("hatched: |mean| < 2 standard errors", fontsize=8)
    return figure


def loadings_figure(pca: SusceptibilityPCA, step: int | None = None,
                    aligned: bool = False, errors: np.ndarray | None = None) -> Figure:
    """One bar chart per PC: every component's loading, with the explained variance.
    ``aligned``: the PCs are in a previous snapshot's order (each labelled with its
    variance rank at this snapshot), else in order of variance. ``errors`` ``(k, C)``:
    error bars (e.g. :func:`~susc_callback.analysis.reliability.loading_errors`)."""
    return _loadings_grid({"": pca}, _title(f"PC loadings ({pca.standardization})", step),
                          aligned, None if errors is None else {"": errors})


def layer_loadings_figure(pcas: dict[str, SusceptibilityPCA], step: int | None = None
                          ) -> Figure:
    """:func:`loadings_figure` of each layer's own PCA, side by side (PCs by variance)."""
    standardization = next(iter(pcas.values())).standardization
    return _loadings_grid(pcas, _title(f"PC loadings of each layer ({standardization})", step),
                          False)


def _loadings_grid(pcas: dict[str, SusceptibilityPCA], title: str, aligned: bool,
                   errors: dict[str, np.ndarray] | None = None) -> Figure:
    count = max(len(p.loadings_) for p in pcas.values())
    widest = max(len(p.component_names_) for p in pcas.values())
    figure = Figure(figsize=(max(5.5, len(pcas) * (0.3 * widest + 1.5)), 1.8 * count + 0.8),
                    layout="constrained")
    grid = figure.subplots(count, len(pcas), squeeze=False)
    for column, (layer, pca) in enumerate(pcas.items()):
        ranks = np.argsort(np.argsort(-pca.explained_variance_ratio_)) + 1
        names = pca.component_names_
        for k, axes in enumerate(grid[:, column]):
            if k >= len(pca.loadings_):
                axes.set_axis_off()
                continue
            loadings = pca.loadings_[k]
            bars = None if errors is None or layer not in errors else errors[layer][k]
            axes.bar(range(len(names)), loadings, yerr=bars, capsize=2,
                     error_kw={"elinewidth": 0.8, "ecolor": "0.3"},
                     color=np.where(loadings < 0, "tab:red", "tab:green"))
            axes.axhline(0.0, color="black", linewidth=0.6)
            share = f"{100 * pca.explained_variance_ratio_[k]:.1f}%"
            axes.set_ylabel(f"aligned PC{k + 1}\n(rank {ranks[k]}, {share})" if aligned
                            else f"PC{k + 1}\n{share}")
            if k == len(pca.loadings_) - 1:
                axes.set_xticks(range(len(names)), names, rotation=90)
            else:
                axes.set_xticks(range(len(names)))
                axes.tick_params(labelbottom=False)
        if layer:
            grid[0, column].set_title(layer, fontsize=9)
    figure.suptitle(title, fontsize=11)
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
        points = axes.scatter(scores[:, d, a], scores[:, d, b], c=np.log1p(steps),
                              cmap="viridis", edgecolors=line.get_color(), s=28, zorder=3)
        axes.annotate(f"{name} @ {steps[-1]}", (scores[-1, d, a], scores[-1, d, b]),
                      fontsize=8, xytext=(3, 3), textcoords="offset points")
    axes.axhline(0.0, color="grey", linewidth=0.5)
    axes.axvline(0.0, color="grey", linewidth=0.5)
    axes.set_xlabel(f"aligned PC{a + 1}")
    axes.set_ylabel(f"aligned PC{b + 1}")
    axes.set_title("Probe datasets over training", fontsize=10)
    if names:
        figure.legend(fontsize=8, loc="outside lower right")
        _step_colour_bar(figure, axes, points, steps)
    return figure


def _step_colour_bar(figure: Figure, axes, mappable, steps: np.ndarray) -> None:
    """A colour bar of the log(1 + step) colouring, ticked at the snapshots' steps."""
    bar = figure.colorbar(mappable, ax=axes, label="training step")
    shown = np.unique(steps)
    if len(shown) > 8:
        shown = shown[np.linspace(0, len(shown) - 1, 8).round().astype(int)]
    bar.set_ticks(np.log1p(shown), labels=[str(int(s)) for s in shown])


def curves_figure(steps: np.ndarray, curves: dict[str, np.ndarray], title: str,
                  ylabel: str) -> Figure:
    """One line per named curve over training steps (log x axis when steps span decades)."""
    figure = Figure(figsize=(7.5, 3.8), layout="constrained")
    axes = figure.add_subplot()
    palette = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"]
    for i, (name, values) in enumerate(curves.items()):
        axes.plot(steps, values, marker="o", markersize=3, label=name,
                  color=palette(i % palette.N))
    positive = steps[steps > 0]
    if len(positive) and positive.max() / positive.min() >= 20:  # log-spaced snapshots
        axes.set_xscale("symlog", linthresh=max(1.0, float(positive.min())))
    axes.set_xlabel("training step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if 0 < len(curves) <= 24:
        figure.legend(fontsize=7, ncols=2 if len(curves) > 12 else 1,
                      loc="outside right upper")
    return figure


def loss_figure(steps: np.ndarray, losses: np.ndarray, snapshots: list[int]) -> Figure:
    """The training loss over steps, each snapshot marked by a dotted vertical line."""
    figure = Figure(figsize=(7.5, 3.0), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(steps, losses, linewidth=1.0, color="tab:blue")
    for step in snapshots:
        axes.axvline(step, color="grey", linewidth=0.6, linestyle=":")
    axes.set_xlabel("training step")
    axes.set_ylabel("training loss")
    axes.set_title("Training loss and snapshots", fontsize=10)
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
    points = None
    for i, scores in enumerate(common.token_scores_):
        if colour_by == "step":
            colours = np.full(len(scores), np.log1p(steps[i]))
            points = axes.scatter(scores[:, a], scores[:, b], c=colours, cmap="viridis", s=4,
                                  alpha=0.35, vmin=np.log1p(steps.min()),
                                  vmax=np.log1p(steps.max()))
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
    axes.set_title("Tokens in the common basis (lines: dataset means)", fontsize=10)
    if colour_by == "step" and points is not None:
        _step_colour_bar(figure, axes, points, steps)
    elif colour_by != "step":
        palette = matplotlib.colormaps["tab10"]
        handles = [Line2D([], [], marker="o", linestyle="", color=palette(d / 9), label=name)
                   for d, name in enumerate(common.dataset_names_)]
        figure.legend(handles=handles, fontsize=8, loc="outside right upper")
    return figure


def figure_to_array(figure: Figure, dpi: int = 100) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB rendering of ``figure``."""
    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _title(text: str, step: int | None) -> str:
    return text if step is None else f"{text}, step {step}"
