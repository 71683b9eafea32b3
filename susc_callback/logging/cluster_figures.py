"""Figures of token clusters and the body plan (matplotlib, no pyplot state)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from susc_callback.clusters.body_plan import BodyPlan
from susc_callback.clusters.clustering import TokenClusters
from susc_callback.clusters.stability import ClusterAgreement
from susc_callback.logging.figures import SUSCEPTIBILITY_COLOURS

MAX_PANELS = 8


def pattern_colours(patterns: np.ndarray) -> dict[str, tuple]:
    """One colour per pattern label, in sorted order (the same in every figure)."""
    names = sorted(set(patterns.tolist()))
    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(names)}


def body_plan_figure(plan: BodyPlan, patterns: np.ndarray) -> Figure:
    """One panel per snapshot (at most ``MAX_PANELS``, evenly spaced, the last always
    shown), every probe token coloured by its pattern label, in the common plane; the last
    snapshot's clusters' mean positions (tracks) drawn over the panels as numbers."""
    count = len(plan.steps_)
    shown = sorted(set(np.linspace(0, count - 1, min(count, MAX_PANELS)).round().astype(int)))
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    fig = Figure(figsize=(3.0 * columns + 1.6, 2.9 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, sharey=True)).ravel()
    colours = pattern_colours(patterns)
    for ax, index in zip(axes, shown):
        points = plan.embedding_[index]
        for name, colour in colours.items():
            where = patterns == name
            ax.scatter(points[where, 0], points[where, 1], s=4, color=colour, alpha=0.6,
                       label=name, linewidths=0)
        for k, track in enumerate(getattr(plan, "tracks_", [])):
            ax.annotate(str(k), track[index], fontsize=7, ha="center", va="center",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7})
        ax.set_title(f"step {plan.steps_[index]}", fontsize=9)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, markerscale=3)
    fig.suptitle(f"Body plan: every probe token of every snapshot in one plane "
                 f"({plan.method_.upper()}), coloured by pattern; numbers: the last "
                 "snapshot's clusters", fontsize=9)
    return fig


def profiles_figure(clusters: TokenClusters, step: int | None) -> Figure:
    """The mean standardized susceptibility vector of every cluster (rows) over the
    components (columns)."""
    profiles = clusters.profiles_
    fig = Figure(figsize=(max(5.0, 0.3 * profiles.shape[1] + 2),
                          max(2.5, 0.3 * len(profiles) + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    scale = float(np.abs(profiles).max()) or 1.0
    image = ax.imshow(profiles, cmap=SUSCEPTIBILITY_COLOURS, vmin=-scale, vmax=scale,
                      aspect="auto")
    ax.set_yticks(range(len(profiles)),
                  [f"{k} ({n})" for k, n in enumerate(clusters.sizes_)], fontsize=7)
    ax.set_xticks(range(len(clusters.component_names_)), clusters.component_names_,
                  rotation=90, fontsize=7)
    ax.set_ylabel("cluster (size)")
    ax.set_title(f"Cluster profiles at step {step} (standardized)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def emergence_figure(emergence: np.ndarray, steps: list, sizes: np.ndarray) -> Figure:
    """For each cluster of the last snapshot, its best Jaccard overlap with a cluster of
    each earlier snapshot's own clustering: when it formed."""
    fig = Figure(figsize=(7.0, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for k, row in enumerate(emergence):
        ax.plot(steps, row, marker="o", markersize=3, label=f"cluster {k} ({sizes[k]})")
    ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("best Jaccard overlap")
    ax.set_ylim(0, 1.05)
    ax.set_title("When the last snapshot's clusters formed", fontsize=9)
    if len(emergence) <= 15:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def stability_figure(agreement: ClusterAgreement) -> Figure:
    """Each cluster of estimate A (largest first): its best Jaccard overlap with a cluster
    of estimate B; the title gives the adjusted Rand index of the two clusterings."""
    order = np.argsort(-agreement.sizes, kind="stable")
    fig = Figure(figsize=(max(4.0, 0.35 * len(order) + 1.5), 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(order)), agreement.best_jaccard[order], color="tab:blue")
    ax.set_xticks(range(len(order)), [f"{k}\n({agreement.sizes[k]})" for k in order],
                  fontsize=7)
    ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("cluster of A (size)")
    ax.set_ylabel("best Jaccard overlap in B")
    ax.set_title(f"Cluster stability between two estimates: adjusted Rand index "
                 f"{agreement.ari:.2f}", fontsize=9)
    return fig
