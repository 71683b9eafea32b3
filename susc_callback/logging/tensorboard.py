"""A result -> TensorBoard: scalars, a custom-scalars layout, figures, projector, text.

Tags (``{c}`` a component, ``{d}`` a probe dataset, ``{k}`` a PC number from 1):

* ``susceptibility/{d}/{c}``: mean susceptibility of component ``c`` on dataset ``d``;
* ``rllc/{c}`` and ``llc/full``: refined LLC of each component, LLC of the full model;
* ``pc_explained_variance/pc{k}`` and ``pc{k}_loading/{c}``: the snapshot's PCA, aligned
  in sign and order to the previous snapshot so that the curves are continuous;
* ``snapshot/seconds``, ``snapshot/time_share`` (snapshot time / training time so far),
  ``snapshot/failed_components``;
* images ``figures/heatmap``, ``figures/pc_loadings``, ``figures/trajectory_pc1_pc2``;
  text ``tokens/top``; projector tensor ``susceptibility``: per snapshot, one point per
  probe token (its vector over components), for the snapshots of this writer's session.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

from susc_callback.analysis.attribution import (
    Decode,
    stored_decoder,
    token_in_context,
    top_tokens_markdown,
)
from susc_callback.analysis.pca import SusceptibilityPCA, standardize
from susc_callback.analysis.series import SnapshotSeries
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.logging.figures import (
    figure_to_array,
    heatmap_figure,
    loadings_figure,
    trajectory_figure,
)

EVENT_FILE_SUFFIX = ".susceptibility"
"""Marks this library's event files, so a resumed run can drop its own orphaned points."""


def snapshot_scalars(result: SusceptibilityResult, pca: SusceptibilityPCA | None
                     ) -> dict[str, float]:
    """The scalar summary of one snapshot (failed components are left out)."""
    scalars = {}
    for row, name in enumerate(result.component_names):
        if name in result.failed:
            continue
        for column, dataset in enumerate(result.dataset_names):
            scalars[f"susceptibility/{dataset}/{name}"] = float(result.dataset_chi[row, column])
        scalars[f"rllc/{name}"] = float(result.rllc[row])
    scalars["llc/full"] = float(result.llc_full)
    scalars["snapshot/failed_components"] = float(len(result.failed))
    if pca is not None:
        for k, ratio in enumerate(pca.explained_variance_ratio_):
            scalars[f"pc_explained_variance/pc{k + 1}"] = float(ratio)
            for name, loading in zip(pca.component_names_, pca.loadings_[k]):
                scalars[f"pc{k + 1}_loading/{name}"] = float(loading)
    return scalars


def custom_scalars_layout(dataset_names: list[str], n_pcs: int) -> dict:
    """Multi-line charts: one per PC (all components), one per dataset, rLLC, cost."""
    def chart(pattern: str) -> list:
        return ["Multiline", [pattern]]

    return {
        "Susceptibility PCs": {
            "explained variance": chart(r"^pc_explained_variance/"),
            **{f"PC{k} loadings": chart(rf"^pc{k}_loading/") for k in range(1, n_pcs + 1)},
        },
        "Susceptibility per dataset": {
            dataset: chart(rf"^susceptibility/{re.escape(dataset)}/")
            for dataset in dataset_names
        },
        "Learning coefficients": {"rLLC per component": chart(r"^rllc/"),
                                  "LLC of the full model": chart(r"^llc/full$")},
        "Snapshot cost": {"seconds": chart(r"^snapshot/seconds$"),
                          "share of training time": chart(r"^snapshot/time_share$")},
    }


class TensorBoardLogger:
    """One long-lived writer into a run directory (a second writer of the projector would
    overwrite its config). Created lazily, flushed after every snapshot."""

    def __init__(self, log_dir: str | Path, top_tokens: int = 5) -> None:
        self.log_dir = Path(log_dir)
        self.top_tokens = top_tokens
        self._writer: SummaryWriter | None = None
        self._layout_written = False

    @property
    def writer(self) -> SummaryWriter:
        if self._writer is None:
            self._writer = SummaryWriter(str(self.log_dir), filename_suffix=EVENT_FILE_SUFFIX)
        return self._writer

    def log_snapshot(self, result: SusceptibilityResult, pca: SusceptibilityPCA | None,
                     series: SnapshotSeries, scalars: dict[str, float]) -> None:
        """Everything about the snapshot at ``result.step`` (token text from the probe texts
        stored in the result, ``<id>`` without them)."""
        decode = stored_decoder(result)
        step = result.step
        writer = self.writer
        if not self._layout_written:
            writer.add_custom_scalars(custom_scalars_layout(result.dataset_names, series.n_pcs))
            self._layout_written = True
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        writer.add_image("figures/heatmap", figure_to_array(heatmap_figure(result)), step,
                         dataformats="HWC")
        if pca is not None:
            writer.add_image("figures/pc_loadings", figure_to_array(loadings_figure(pca, step)),
                             step, dataformats="HWC")
            writer.add_image("figures/trajectory_pc1_pc2",
                             figure_to_array(trajectory_figure(series)), step, dataformats="HWC")
        writer.add_text("tokens/top", top_tokens_markdown(result, decode, self.top_tokens), step)
        self._log_projector(result, decode)
        writer.flush()

    def _log_projector(self, result: SusceptibilityResult, decode: Decode) -> None:
        keep = [row for row, name in enumerate(result.component_names)
                if name not in result.failed]
        if not keep:
            return
        vectors = standardize(result.chi[keep], "none")  # tokens x components
        token_dataset = result.token_dataset
        metadata = []
        for i in range(len(vectors)):
            context, token = token_in_context(result, i, decode, before=3)
            metadata.append([token or "(end)", f"{context}[{token}]",
                             result.dataset_names[token_dataset[i]],
                             str(result.token_sequence[i]), str(result.token_position[i])])
        self.writer.add_embedding(vectors.astype(np.float32), metadata=metadata,
                                  metadata_header=["token", "context", "dataset", "sequence",
                                                   "position"],
                                  global_step=result.step, tag="susceptibility")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def drop_events(log_dir: str | Path) -> int:
    """Remove this library's events from the event files in ``log_dir`` before the run is
    logged afresh from the saved results, so that it shows no orphaned or duplicated
    points. Other writers' files (the Trainer's) are left alone. Returns the number of
    events dropped."""
    dropped = 0
    for path in sorted(Path(log_dir).glob(f"events.out.tfevents.*{EVENT_FILE_SUFFIX}")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if event_pb2.Event.FromString(r).HasField("file_version")]
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as handle:
            writer = RecordWriter(handle)
            for record in kept:
                writer.write(record)
            writer.flush()
        temporary.replace(path)
    return dropped


def remove_projector(log_dir: str | Path) -> None:
    """Delete this library's projector files (config and per-step embedding folders) from
    ``log_dir``, before a run directory is rebuilt from saved results."""
    log_dir = Path(log_dir)
    (log_dir / "projector_config.pbtxt").unlink(missing_ok=True)
    for folder in log_dir.glob("[0-9]*/susceptibility"):
        shutil.rmtree(folder)
