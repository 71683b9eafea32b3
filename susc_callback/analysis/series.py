"""A run's snapshots in step order: where they are saved, and their PCs followed over time."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from susc_callback.analysis.pca import Standardization, SusceptibilityPCA
from susc_callback.config import SGLDConfig
from susc_callback.estimator.results import SusceptibilityResult

_STEP_DIR = re.compile(r"^step-(\d+)$")
_RUN_INDEPENDENT_CONFIG = ("progress", "device", "on_divergence", "batch_chains",
                           "max_batched_chains")
"""Config fields that do not change the estimate: results differing only in these mix."""


def step_dir(root: str | Path, step: int) -> Path:
    """Where the result of ``step`` lives under ``root`` (``root/step-{step}``)."""
    return Path(root) / f"step-{step}"


def saved_steps(root: str | Path) -> dict[int, Path]:
    """``{step: directory}`` of the complete saved results under ``root``, in step order."""
    root = Path(root)
    found = {}
    if root.is_dir():
        for path in root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / "meta.json").is_file() and (path / "arrays.safetensors").is_file():
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def check_same_settings(result: SusceptibilityResult, config: SGLDConfig,
                        components: list[str], path: str | Path) -> None:
    """Refuse to mix, in one series, a saved result computed with other components or SGLD
    settings (fields that do not change the estimate, e.g. ``progress``, may differ)."""
    def comparable(values: dict) -> dict:
        return {k: v for k, v in values.items() if k not in _RUN_INDEPENDENT_CONFIG}

    if comparable(result.config) != comparable(config.to_dict()) or \
            list(result.component_names) != list(components):
        raise ValueError(f"The saved snapshot {path} was computed with other components or SGLD "
                         "settings than this run's; use the same settings, or write to a new "
                         "output directory (or overwrite with --force in the CLI)")


class SnapshotSeries:
    """Per-snapshot PCA, each aligned (sign and order) to the previous snapshot's, so that
    PC loadings and the probe datasets' scores can be followed as curves over training."""

    def __init__(self, n_pcs: int = 3,
                 standardization: Standardization = "structural-inference") -> None:
        self.n_pcs, self.standardization = n_pcs, standardization
        self.pcas: dict[int, SusceptibilityPCA] = {}

    def add(self, result: SusceptibilityResult) -> SusceptibilityPCA | None:
        """Fit the PCA of ``result`` (its ``step`` must be set and later than any added).
        None, and nothing added, when fewer than 2 components are finite: no PCs exist."""
        if result.step is None:
            raise ValueError("A result needs its training step to join a series")
        if self.pcas and result.step <= max(self.pcas):
            raise ValueError(f"Snapshot at step {result.step} is not after the last one "
                             f"(step {max(self.pcas)})")
        if result.finite_components.sum() < 2:
            return None
        pca = SusceptibilityPCA(self.n_pcs, self.standardization).fit(result)
        if self.pcas:
            pca.align_to(self.pcas[max(self.pcas)])
        self.pcas[result.step] = pca
        return pca

    @classmethod
    def load(cls, root: str | Path, n_pcs: int = 3,
             standardization: Standardization = "structural-inference",
             up_to: int | None = None) -> SnapshotSeries:
        """The series of the results saved under ``root`` (those at steps <= ``up_to``)."""
        series = cls(n_pcs, standardization)
        for step, path in saved_steps(root).items():
            if up_to is None or step <= up_to:
                series.add(SusceptibilityResult.load(path))
        return series

    def dataset_trajectories(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(steps (S,), dataset names (D), scores (S, D, n_pcs))``: each probe dataset's
        mean token score on the aligned PCs at every snapshot (NaN where a snapshot has
        fewer PCs or lacks the dataset)."""
        steps = np.array(sorted(self.pcas), dtype=np.int64)
        names = list(dict.fromkeys(n for p in self.pcas.values() for n in p.dataset_names_))
        scores = np.full((len(steps), len(names), self.n_pcs), np.nan)
        for i, step in enumerate(steps):
            pca = self.pcas[int(step)]
            for d, name in enumerate(pca.dataset_names_):
                k = pca.dataset_scores_.shape[1]
                scores[i, names.index(name), :k] = pca.dataset_scores_[d]
        return steps, names, scores
