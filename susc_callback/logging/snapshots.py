"""The one path by which a snapshot reaches the user: stored, analysed, logged.

The callback (during training) and ``susc analyze`` (afterwards) both publish through a
:class:`SnapshotPublisher`: it saves each result in the run store, adds it to the run's
:class:`~susc_callback.analysis.series.SnapshotSeries` (PCs aligned across snapshots) and
writes the TensorBoard view, with the snapshot's token clusters
(:func:`~susc_callback.clusters.snapshot.cluster_snapshot`). On resume it restores the
history up to a step; after an offline analysis it rebuilds the whole TensorBoard run from
the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from susc_callback.analysis.pca import Standardization
from susc_callback.analysis.series import SnapshotSeries
from susc_callback.clusters.snapshot import cluster_snapshot
from susc_callback.config import SGLDConfig
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.logging.tensorboard import (
    SnapshotMedia,
    TensorBoardLogger,
    drop_events,
    remove_projector,
    snapshot_scalars,
)
from susc_callback.store.run import OnDamaged, RunStore, check_same_settings

EXTRA_SCALARS = "snapshot_scalars"
"""Key of ``result.extra`` holding the scalars logged with a snapshot that the result itself
cannot give (its time and its share of the training time)."""


@dataclass(frozen=True)
class Restored:
    """What :meth:`SnapshotPublisher.restore` found: the steps that rejoined the series,
    and those set aside (and where to)."""

    kept: list[int]
    set_aside: list[int]
    set_aside_to: Path | None


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
        series; later ones belong to a discarded continuation and are set aside. The
        TensorBoard run is then rebuilt from the kept results, so that it shows exactly
        the store (also what a kill between saving and logging left out)."""
        saved = self.store.saved_steps()
        kept = {step: SusceptibilityResult.load(saved[step]) for step in saved
                if 0 < resumed_step and step <= resumed_step}
        for step, result in kept.items():
            check_same_settings(result, config, components, saved[step])
        orphans = [step for step in saved if step not in kept]
        set_aside_to = self.store.set_aside(orphans) if orphans else None
        self._relog(list(kept.values()))
        return Restored(list(kept), orphans, set_aside_to)

    def publish(self, result: SusceptibilityResult,
                extra_scalars: dict[str, float] | None = None
                ) -> tuple[dict[str, float], SnapshotMedia]:
        """Save ``result`` (with ``extra_scalars``, e.g. its timing, so that a rebuilt
        TensorBoard run shows them too), add it to the series and log it; returns the
        scalars and the figures logged."""
        if extra_scalars:
            result.extra[EXTRA_SCALARS] = dict(extra_scalars)
        self.store.save(result)
        return self._log(result)

    def rebuild(self, on_damaged: OnDamaged | None = None) -> int:
        """Replace the TensorBoard run by one built from every result in the store
        (idempotent); returns the number of snapshots logged. ``on_damaged``: as in
        :meth:`RunStore.load_all`."""
        results = self.store.load_all(on_damaged=on_damaged)
        self._relog(results)
        return len(results)

    def close(self) -> None:
        self.logger.close()

    def _relog(self, results: list[SusceptibilityResult]) -> None:
        """Drop this library's TensorBoard events and projector, then log ``results``
        afresh."""
        drop_events(self.log_dir)
        remove_projector(self.log_dir)
        self.series = SnapshotSeries(self.series.n_pcs, self.series.standardization)
        for result in results:
            self._log(result)

    def _log(self, result: SusceptibilityResult) -> tuple[dict[str, float], SnapshotMedia]:
        pca = self.series.add(result)
        clusters = cluster_snapshot(result)
        scalars = {**snapshot_scalars(result, pca), **clusters.scalars(),
                   **result.extra.get(EXTRA_SCALARS, {})}
        return scalars, self.logger.log_snapshot(result, pca, self.series, scalars, clusters)
