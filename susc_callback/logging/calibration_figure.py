"""The loss traces of a calibration sweep, one panel per setting (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from susc_callback.calibration.sweep import Calibration


def calibration_figure(calibration: Calibration) -> Figure:
    """Rows: ``(n_beta, gamma)``; columns: step sizes. Each panel holds the full chain's
    mean probe loss of every chain over the draws, titled with its diagnostics; stationary
    settings are green, the others red with their first problem, the recommended one
    framed."""
    settings = calibration.settings
    steps = sorted({s.step_size for s in settings})
    rows = sorted({(s.n_beta, s.gamma) for s in settings})
    fig = Figure(figsize=(3.2 * len(steps) + 0.5, 2.5 * len(rows)), layout="constrained")
    axes = np.array(fig.subplots(len(rows), len(steps), squeeze=False))
    chosen = calibration.recommended
    for setting in settings:
        ax = axes[rows.index((setting.n_beta, setting.gamma)), steps.index(setting.step_size)]
        if setting.traces is not None:
            for chain in setting.traces:
                ax.plot(chain, linewidth=0.8)
        colour = "tab:green" if setting.stationary else "tab:red"
        verdict = "stationary" if setting.stationary else _short(setting.problems[0])
        ax.set_title(f"eps {setting.step_size:g}, nβ {setting.n_beta:g}, γ {setting.gamma:g}\n"
                     f"ESS {setting.ess:.0f}, drift {setting.drift:+.1f}, R̂ "
                     f"{setting.rhat:.2f}\n{verdict}", fontsize=7, color=colour)
        ax.tick_params(labelsize=6)
        if chosen is not None and (chosen.step_size, chosen.n_beta, chosen.gamma) == (
                setting.step_size, setting.n_beta, setting.gamma):
            for spine in ax.spines.values():
                spine.set_linewidth(2.5)
                spine.set_color("tab:green")
    for ax in axes[-1]:
        ax.set_xlabel("draw", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("mean probe loss", fontsize=7)
    fig.suptitle("Full chain's traces per setting (framed: recommended)", fontsize=9)
    return fig


def _short(problem: str, width: int = 48) -> str:
    return problem if len(problem) <= width else problem[:width - 1] + "…"


def save_calibration_figure(calibration: Calibration, path: str | Path) -> Path:
    path = Path(path)
    calibration_figure(calibration).savefig(path, dpi=120)
    return path
