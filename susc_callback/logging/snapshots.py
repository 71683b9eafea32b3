"""The one path by which a snapshot reaches the user: stored, analysed, logged.

The callback (during training) and ``susc analyze`` (afterwards) both publish through a
:class:`SnapshotPublisher`: it saves each result in the run store, adds it to the run's
:class:`~susc_callback.analysis.series.SnapshotSeries` (PCs aligned across snapshots) and
writes the TensorBoard view. On resume it restores the history up to a step; after an
offline analysis it rebuilds the whole TensorBoard run from the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from susc_callback.analysis.pca import Standardization
from susc_callback.analysis.series import SnapshotSeries
from susc_callback.config import SGLDConfig
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.logging.tensorboard import (
    TensorBoardLogger,
    drop_events_after,
    remove_projector,
    snapshot_scalars,
)
from susc_callback.store.run import RunStore, check_same_settings


@dataclass(frozen=True)
class Restored:
    """What :meth:`SnapshotPublisher.restore` found: the steps that rejoined the series,
    those set aside (and where to), and the TensorBoard events dropped."""

    kept: list[int]
    set_aside: list[int]
    set_aside_to: Path | None
    dropped_events: int


class SnapshotPublisher:
    """Publishes a run's snapshots from ``store`` into the TensorBoard run ``log_dir``."""

    def __init__(self, store: RunStore, log_dir: str | Path, n_pcs: int = 3,
                 standardization: Standardization = "structural-inference",
                 top_tokens: int = 5) -> None:
        self.store, self.log_dir = store, Path(log_dir)
        self.series = SnapshotSeries(n_pcs, standardization)
        self.logger = TensorBoardLogger(log_dir, top_tokens)

    def restore(self, resumed_step: int, config: SGLDConfig, components: list[str]
                ) -> Restored:
        """Resume at ``resumed_step`` (0: a new run). Saved results up to it are checked
        against this run's settings (before anything on disk changes) and rejoin the
        series; later ones belong to a discarded continuation and are set aside, and this
        library's TensorBoard events after it are dropped."""
        saved = self.store.saved_steps()
        kept = [step for step in saved if resumed_step > 0 and step <= resumed_step]
        for step in kept:
            result = SusceptibilityResult.load(saved[step])
            check_same_settings(result, config, components, saved[step])
            self.series.add(result)
        orphans = [step for step in saved if step not in kept]
        set_aside_to = self.store.set_aside(orphans) if orphans else None
        dropped = drop_events_after(self.log_dir, resumed_step if resumed_step > 0 else None)
        return Restored(kept, orphans, set_aside_to, dropped)

    def publish(self, result: SusceptibilityResult,
                extra_scalars: dict[str, float] | None = None) -> dict[str, float]:
        """Save ``result``, add it to the series and log it; returns the scalars logged."""
        self.store.save(result)
        return self._log(result, extra_scalars)

    def rebuild(self) -> int:
        """Replace the TensorBoard run by one built from every result in the store
        (idempotent); returns the number of snapshots logged."""
        drop_events_after(self.log_dir, None)
        remove_projector(self.log_dir)
        self.series = SnapshotSeries(self.series.n_pcs, self.series.standardization)
        results = self.store.load_all()
        for result in results:
            self._log(result, None)
        return len(results)

    def close(self) -> None:
        self.logger.close()

    def _log(self, result: SusceptibilityResult, extra_scalars: dict[str, float] | None
             ) -> dict[str, float]:
        pca = self.series.add(result)
        scalars = {**snapshot_scalars(result, pca), **(extra_scalars or {})}
        self.logger.log_snapshot(result, pca, self.series, scalars)
        return scalars
