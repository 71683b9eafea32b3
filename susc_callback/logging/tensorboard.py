"""A result -> TensorBoard: scalars, a custom-scalars layout, figures, projector, text.

Tags (``{c}`` a component, ``{d}`` a probe dataset, ``{k}`` a PC number from 1):

* ``susceptibility/{d}/{c}``: mean susceptibility of component ``c`` on dataset ``d``;
* ``rllc/{c}`` and ``llc/full``: refined LLC of each component, LLC of the full model;
* ``susceptibility_se/{d}/{c}``, ``rllc_se/{c}``, ``llc_se/full``: their standard errors
  (a jackknife over blocks of draws, :mod:`susc_callback.estimator.sums`);
* ``diagnostics/{rhat,ess,drift}/{c}`` (and ``/full``): the chains' split R-hat, effective
  sample size and drift of the mean probe loss (:mod:`susc_callback.analysis.diagnostics`),
  and ``diagnostics/localisation/{c}``: the share of the posterior's spread the
  localisation sets;
* ``reliability/split_half/{c}``, ``reliability/matrix``, ``reliability/pc{k}_loadings``:
  how well the two halves of the chains agree (:mod:`susc_callback.analysis.reliability`);
* ``aligned_pc{k}/explained_variance``, ``aligned_pc{k}/variance_rank`` and
  ``aligned_pc{k}_loading/{c}``: the snapshot's PCs *aligned* in sign and order to the
  previous snapshot's, so that a curve follows one direction; ``aligned_pc2`` is not
  necessarily the PC with the second largest variance at that snapshot (its
  ``variance_rank`` says which it is);
* ``pc_spectrum/pc{k}``: the explained variance of the snapshot's PCs in order of variance
  (PC{k} of a paper's table);
* ``snapshot/seconds``, ``snapshot/time_share`` (snapshot time / training time so far),
  ``snapshot/failed_components``;
* images ``figures/heatmap``, ``figures/pc_loadings`` (the aligned PCs, each labelled with
  its variance rank), ``figures/pc_loadings_per_layer`` (a PCA of each layer's heads),
  ``figures/trajectory_pc1_pc2``, and over training (a log step axis and a legend, which
  TensorBoard's scalar charts lack): ``figures/aligned_pc1_loadings_over_training``;
  text ``tokens/top``; projector tensor ``susceptibility``: per snapshot, one point per
  probe token (its vector over components) with its token, context, dataset, pattern
  label and cluster as metadata, for the snapshots of this writer's session;
* ``clusters/count``, ``clusters/largest_share``, ``clusters/median_share``,
  ``clusters/unclustered_share``, ``clusters/induction_purity`` and the histogram
  ``clusters/sizes``: the snapshot's token clusters (:mod:`susc_callback.clusters`).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
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
from susc_callback.analysis.diagnostics import localisation_shares, trace_diagnostics
from susc_callback.analysis.pca import SusceptibilityPCA, layer_pcas, standardize
from susc_callback.analysis.reliability import loading_errors, split_half_or_none
from susc_callback.analysis.series import SnapshotSeries
from susc_callback.clusters.snapshot import SnapshotClusters
from susc_callback.components.architectures import group_by_layer
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.logging.figures import (
    curves_figure,
    figure_to_array,
    heatmap_figure,
    layer_loadings_figure,
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
            if result.dataset_chi_se is not None:
                scalars[f"susceptibility_se/{dataset}/{name}"] = float(
                    result.dataset_chi_se[row, column])
        scalars[f"rllc/{name}"] = float(result.rllc[row])
        if result.rllc_se is not None:
            scalars[f"rllc_se/{name}"] = float(result.rllc_se[row])
    scalars["llc/full"] = float(result.llc_full)
    if result.llc_full_se is not None:
        scalars["llc_se/full"] = float(result.llc_full_se)
    for name, found in trace_diagnostics(result).items():
        for key in ("rhat", "ess", "drift"):
            scalars[f"diagnostics/{key}/{name}"] = float(getattr(found, key))
    scalars |= {f"diagnostics/localisation/{name}": float(share)
                for name, share in localisation_shares(result).items()
                if name not in result.failed}
    scalars |= _reliability_scalars(result, pca)
    scalars["snapshot/failed_components"] = float(len(result.failed))
    if pca is not None:
        ranks = variance_ranks(pca)
        for k, ratio in enumerate(pca.explained_variance_ratio_):
            scalars[f"aligned_pc{k + 1}/explained_variance"] = float(ratio)
            scalars[f"aligned_pc{k + 1}/variance_rank"] = float(ranks[k])
            for name, loading in zip(pca.component_names_, pca.loadings_[k]):
                scalars[f"aligned_pc{k + 1}_loading/{name}"] = float(loading)
        for k, ratio in enumerate(sorted(pca.explained_variance_ratio_, reverse=True)):
            scalars[f"pc_spectrum/pc{k + 1}"] = float(ratio)
    return scalars


def _reliability_scalars(result: SusceptibilityResult, pca: SusceptibilityPCA | None
                         ) -> dict[str, float]:
    """Split-half reliability of the snapshot (none without half estimates)."""
    halves = split_half_or_none(result, pca)
    if halves is None:
        return {}
    scalars = {f"reliability/split_half/{name}": float(r)
               for name, r in zip(halves.component_names, halves.component_r)}
    scalars["reliability/matrix"] = halves.matrix_r
    scalars |= {f"reliability/pc{k + 1}_loadings": float(r)
                for k, r in enumerate(halves.loadings_r)}
    return scalars


def variance_ranks(pca: SusceptibilityPCA) -> np.ndarray:
    """``(k,)``: the variance rank (1 = largest) at its own snapshot of each of ``pca``'s
    PCs, which after :meth:`~SusceptibilityPCA.align_to` are in the previous snapshot's
    order, not in order of variance."""
    return np.argsort(np.argsort(-np.asarray(pca.explained_variance_ratio_))) + 1


def custom_scalars_layout(dataset_names: list[str], n_pcs: int, component_names: list[str]
                          ) -> dict:
    """Multi-line charts: the PC spectrum, each aligned PC's loadings, the datasets' means
    and rLLC, per layer (TensorBoard colours lines without a legend: a chart holds one
    layer's components, named in the tooltip)."""
    def chart(pattern: str) -> list:
        return ["Multiline", [pattern]]

    def per_layer(title: str, prefix: str) -> dict[str, list]:
        return {f"{title}, {layer or 'other'}": chart(
            rf"^{prefix}(" + "|".join(re.escape(n) for n in names) + ")$")
            for layer, names in _layers(component_names).items()}

    return {
        "Susceptibility PCs": {
            "spectrum (variance-ranked PCs of each snapshot)": chart(r"^pc_spectrum/"),
            "aligned PCs: explained variance": chart(r"^aligned_pc\d+/explained_variance$"),
            **{k: v for j in range(1, n_pcs + 1)
               for k, v in per_layer(f"aligned PC{j} loadings", rf"aligned_pc{j}_loading/")
               .items()},
        },
        "Susceptibility per dataset": {
            f"{dataset}, {layer or 'other'}": chart(
                rf"^susceptibility/{re.escape(dataset)}/(" + "|".join(map(re.escape, names))
                + ")$")
            for dataset in dataset_names for layer, names in _layers(component_names).items()
        },
        "Learning coefficients": {**per_layer("rLLC", "rllc/"),
                                  "LLC of the full model": chart(r"^llc/full$")},
        "How far to trust": {**per_layer("split-half r", "reliability/split_half/"),
                             **per_layer("R-hat", "diagnostics/rhat/"),
                             **per_layer("localisation share", "diagnostics/localisation/"),
                             "whole matrix and PC loadings, split-half r": chart(
                                 r"^reliability/(matrix|pc\d+_loadings)$")},
        "Snapshot cost": {"seconds": chart(r"^snapshot/seconds$"),
                          "share of training time": chart(r"^snapshot/time_share$")},
    }


def _layers(component_names: list[str]) -> dict[str, list[str]]:
    return {layer: [component_names[i] for i in rows]
            for layer, rows in group_by_layer(component_names).items()}


@dataclass
class SnapshotMedia:
    """A snapshot's figures (``{tag: (H, W, 3) uint8}``) and texts (``{tag: Markdown}``),
    rendered once for TensorBoard and for the other loggers."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


def snapshot_media(result: SusceptibilityResult, pca: SusceptibilityPCA | None,
                   series: SnapshotSeries, top_tokens: str) -> SnapshotMedia:
    """The figures and token table of the snapshot at ``result.step``."""
    step = result.step
    figures = {"figures/heatmap": heatmap_figure(result)}
    if pca is not None:
        steps, curves = series.loading_curves(0)
        figures |= {
            "figures/pc_loadings": loadings_figure(pca, step, aligned=len(series.pcas) > 1,
                                                   errors=loading_errors(result, pca)),
            "figures/aligned_pc1_loadings_over_training": curves_figure(
                steps, curves, "Aligned PC1 loadings over training", "loading"),
            "figures/trajectory_pc1_pc2": trajectory_figure(series)}
    layers = layer_pcas(result, series.n_pcs, series.standardization)
    if len(layers) > 1:
        figures["figures/pc_loadings_per_layer"] = layer_loadings_figure(layers, step)
    return SnapshotMedia({tag: figure_to_array(figure) for tag, figure in figures.items()},
                         {"tokens/top": top_tokens})


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
                     series: SnapshotSeries, scalars: dict[str, float],
                     clusters: SnapshotClusters | None = None) -> SnapshotMedia:
        """Everything about the snapshot at ``result.step`` (token text from the probe texts
        stored in the result, ``<id>`` without them)."""
        decode = stored_decoder(result)
        step = result.step
        writer = self.writer
        if not self._layout_written:
            writer.add_custom_scalars(custom_scalars_layout(
                result.dataset_names, series.n_pcs, result.component_names))
            self._layout_written = True
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        media = snapshot_media(result, pca, series, top_tokens_markdown(
            result, decode, self.top_tokens))
        for tag, image in media.images.items():
            writer.add_image(tag, image, step, dataformats="HWC")
        for tag, text in media.texts.items():
            writer.add_text(tag, text, step)
        if clusters is not None and clusters.clusters is not None:
            writer.add_histogram("clusters/sizes", clusters.clusters.sizes_, step)
        self._log_projector(result, decode, clusters)
        writer.flush()
        return media

    def _log_projector(self, result: SusceptibilityResult, decode: Decode,
                       clusters: SnapshotClusters | None) -> None:
        keep = [row for row, name in enumerate(result.component_names)
                if name not in result.failed]
        if not keep:
            return
        vectors = standardize(result.chi[keep], "none")  # tokens x components
        token_dataset = result.token_dataset
        labels = None if clusters is None or clusters.clusters is None else \
            clusters.clusters.labels_
        metadata = []
        for i in range(len(vectors)):
            context, token = token_in_context(result, i, decode, before=3)
            metadata.append([token or "(end)", f"{context}[{token}]",
                             result.dataset_names[token_dataset[i]],
                             str(result.token_sequence[i]), str(result.token_position[i]),
                             "" if clusters is None else str(clusters.patterns[i]),
                             "" if labels is None else str(labels[i])])
        self.writer.add_embedding(vectors.astype(np.float32), metadata=metadata,
                                  metadata_header=["token", "context", "dataset", "sequence",
                                                   "position", "pattern", "cluster"],
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
