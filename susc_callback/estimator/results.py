"""The result of one susceptibility estimate, saved as safetensors + JSON."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.estimator.result_checks import check_result_fields
from susc_callback.estimator.sums import (
    DrawSums,
    covariance_susceptibilities,
    half_susceptibilities,
    jackknife_se,
    mean_phi_replicates,
    susceptibilities,
    susceptibility_replicates,
)
from susc_callback.store.files import ResultFileError, read_folder, write_folder

_ARRAYS = ("chi", "dataset_chi", "rllc", "mean_phi", "anchor_loss", "loss_traces",
           "full_loss_trace", "token_sequence", "token_position", "probe_input_ids",
           "probe_attention_mask")
_OPTIONAL_ARRAYS = ("chi_covariance", "chi_se", "dataset_chi_se", "rllc_se", "llc_full_se",
                    "probe_traces", "full_probe_trace", "chi_halves",
                    "localisation", "full_localisation")
_FORMAT_VERSION = 4
_READABLE_VERSIONS = (1, 2, 3, 4)  # 1 has no chi_covariance, 1 and 2 no standard errors,
                                   # 1-3 no phi traces


@dataclass
class SusceptibilityResult:
    """Susceptibilities of C components on P probe tokens from D probe datasets.

    Sign convention: ``chi < 0`` means the component *expresses* the pattern of the token
    (moving the component's weights the way the posterior allows lowers that token's loss
    together with the sampling loss); ``chi > 0`` means it suppresses it.

    Attributes:
        component_names: C names, rows of every matrix.
        chi: ``(C, P)`` per-token susceptibilities (NaN rows for failed components).
        chi_covariance: ``(C, P)`` its covariance part ``-Cov_C(phi, l_x - L)``, without the
            baseline correction ``-E_C[phi] (E_C - E_full)[l_x - L]`` (see
            :mod:`~susc_callback.estimator.sums`); None in results saved before it was
            stored.
        dataset_names: D probe dataset labels.
        dataset_chi: ``(C, D)`` mean of ``chi`` over each dataset's tokens.
        rllc: ``(C,)`` refined local learning coefficients, ``n_beta * E_C[phi]``.
        llc_full: LLC of the full model, ``n_beta * E_full[phi]``.
        mean_phi: ``(C,)`` ``E_C[L(w) - L(w*)]``.
        anchor_loss: ``(C,)`` ``L(w*)`` used for each component's ``phi``.
        loss_traces: ``(C, chains, draws)`` observable loss ``L`` at every draw.
        full_loss_trace: ``(chains, draws)`` the same for the full chain.
        probe_traces, full_probe_trace: the same for the mean loss of the probe tokens, one
            set for every chain and draw whatever the observable (the chain diagnostics'
            trace); None in results saved before they were stored (see
            :meth:`diagnostic_traces`).
        chi_halves: ``(2, C, P)`` ``chi`` from each half of the chains (of the blocks of
            draws, with one chain), for split-half reliability
            (:mod:`~susc_callback.analysis.reliability`); None in older results.
        localisation, full_localisation: ``(C,)`` and a float: the share of each posterior's
            spread that the localisation sets, ``gamma (1 - eps gamma / 4) E|u - u*|^2 / d``
            (near 1: the loss
            hardly confines the component, so its susceptibilities mostly reflect gamma;
            :meth:`~susc_callback.estimator.sums.DrawSums.localisation_share`); None in
            older results.
        token_sequence, token_position: ``(P,)`` where each probe token sits in the probe
            (token ``(s, t)`` is the loss of predicting ``probe_input_ids[s, t+1]``).
        token_dataset: ``(P,)`` index into ``dataset_names``.
        probe_input_ids, probe_attention_mask: the probe sequences ``(S, T)``.
        sequence_datasets: S dataset labels, one per probe sequence.
        chi_se, dataset_chi_se, rllc_se, llc_full_se: standard errors of ``chi``,
            ``dataset_chi``, ``rllc`` and ``llc_full``: a jackknife over blocks of draws of
            every chain (:mod:`~susc_callback.estimator.sums`); None in results saved
            before they were stored.
        failed: ``{component name: reason}`` for components whose chains diverged.
        config: the SGLD configuration as a dict.
        step: training step of the checkpoint, if known.
    """

    component_names: list[str]
    chi: np.ndarray
    dataset_names: list[str]
    dataset_chi: np.ndarray
    rllc: np.ndarray
    llc_full: float
    mean_phi: np.ndarray
    anchor_loss: np.ndarray
    loss_traces: np.ndarray
    full_loss_trace: np.ndarray
    token_sequence: np.ndarray
    token_position: np.ndarray
    probe_input_ids: np.ndarray
    probe_attention_mask: np.ndarray
    sequence_datasets: list[str]
    config: dict[str, Any]
    step: int | None = None
    failed: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    chi_covariance: np.ndarray | None = None
    chi_se: np.ndarray | None = None
    dataset_chi_se: np.ndarray | None = None
    rllc_se: np.ndarray | None = None
    llc_full_se: float | None = None
    probe_traces: np.ndarray | None = None
    full_probe_trace: np.ndarray | None = None
    chi_halves: np.ndarray | None = None
    localisation: np.ndarray | None = None
    full_localisation: float | None = None

    def diagnostic_traces(self) -> tuple[np.ndarray, np.ndarray]:
        """The traces the chain diagnostics read, ``(C, chains, draws)`` and ``(chains,
        draws)``: the mean probe loss at every draw, or, in results saved before it was
        kept, the observable loss ``L`` (then always on one fixed set)."""
        if self.probe_traces is not None and self.full_probe_trace is not None:
            return self.probe_traces, self.full_probe_trace
        return self.loss_traces, self.full_loss_trace

    @property
    def token_dataset(self) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.dataset_names)}
        per_sequence = np.array([index[d] for d in self.sequence_datasets], dtype=np.int64)
        return per_sequence[self.token_sequence]

    @property
    def finite_components(self) -> np.ndarray:
        """``(C,)`` bool: components whose susceptibilities are all finite (a failed
        component's row is NaN)."""
        return np.isfinite(self.chi).all(axis=1)

    @property
    def target_token_ids(self) -> np.ndarray:
        """``(P,)`` id of the token each probe token predicts."""
        return self.probe_input_ids[self.token_sequence, self.token_position + 1]

    def subset(self, names: list[str]) -> SusceptibilityResult:
        """The result restricted to the components ``names``, in that order (e.g. one
        layer's heads, for a per-layer PCA)."""
        unknown = [n for n in names if n not in self.component_names]
        if unknown:
            raise ValueError(f"Unknown components {unknown}; have {self.component_names}")
        rows = [self.component_names.index(n) for n in names]
        return replace(self, component_names=list(names),
                       failed={n: r for n, r in self.failed.items() if n in names},
                       chi_halves=None if self.chi_halves is None else self.chi_halves[:, rows],
                       **{key: _rows(getattr(self, key), rows) for key in _PER_COMPONENT})

    @classmethod
    def from_sums(cls, sums: dict[str, DrawSums], full: DrawSums, probe: ProbeSet,
                  token_sequence: np.ndarray, token_position: np.ndarray,
                  anchor: torch.Tensor | None, config: SGLDConfig, step: int | None,
                  failed: dict[str, str]) -> SusceptibilityResult:
        """The result of an estimate from its running sums: ``sums`` per component in row
        order, ``full`` the full chain's; ``anchor`` the fixed ``L(w*)``, or None when
        it varied per draw. Failed components get NaN rows."""
        names = list(sums)
        datasets = probe.dataset_names
        per_sequence = np.array([datasets.index(d) for d in probe.datasets])
        token_dataset = per_sequence[token_sequence]
        chi = np.full((len(names), len(token_sequence)), np.nan)
        chi_covariance, chi_se = chi.copy(), chi.copy()
        chi_halves = np.full((2, *chi.shape), np.nan)
        mean_phi, rllc_se = np.full(len(names), np.nan), np.full(len(names), np.nan)
        localisation = np.full(len(names), np.nan)
        dataset_chi_se = np.full((len(names), len(datasets)), np.nan)
        for row, name in enumerate(names):
            if name not in failed:
                chi[row] = susceptibilities(sums[name], full)
                chi_covariance[row] = covariance_susceptibilities(sums[name])
                chi_halves[:, row] = half_susceptibilities(sums[name], full)
                mean_phi[row] = sums[name].mean_phi()
                localisation[row] = sums[name].localisation_share(config.gamma,
                                                                  config.step_size)
                replicates, phi_replicates = susceptibility_replicates(sums[name], full)
                chi_se[row] = jackknife_se(replicates)
                dataset_chi_se[row] = jackknife_se(mean_per_dataset(
                    replicates, token_dataset, len(datasets)))
                rllc_se[row] = config.n_beta * jackknife_se(phi_replicates)
        dataset_chi = mean_per_dataset(chi, token_dataset, len(datasets))
        full_phi_replicates = mean_phi_replicates(full)
        ids = probe.input_ids
        ids = ids.numpy() if ids is not None else np.zeros((len(probe), 0), np.int64)
        mask = probe.attention_mask
        mask = mask.numpy() if mask is not None else np.ones_like(ids)
        return cls(
            component_names=names, chi=chi, dataset_names=datasets, dataset_chi=dataset_chi,
            rllc=config.n_beta * mean_phi, llc_full=config.n_beta * full.mean_phi(),
            mean_phi=mean_phi,
            anchor_loss=np.array([sums[n].mean_anchor() if anchor is None else float(anchor)
                                  for n in names]),
            loss_traces=np.stack([sums[n].loss_trace.cpu().numpy() for n in names]),
            full_loss_trace=full.loss_trace.cpu().numpy(),
            probe_traces=np.stack([sums[n].probe_trace.cpu().numpy() for n in names]),
            full_probe_trace=full.probe_trace.cpu().numpy(), chi_halves=chi_halves,
            localisation=localisation,
            full_localisation=full.localisation_share(config.gamma, config.step_size),
            token_sequence=token_sequence.astype(np.int64),
            token_position=token_position.astype(np.int64),
            probe_input_ids=ids, probe_attention_mask=mask,
            sequence_datasets=list(probe.datasets), config=config.to_dict(), step=step,
            failed=dict(failed), chi_covariance=chi_covariance, chi_se=chi_se,
            dataset_chi_se=dataset_chi_se, rllc_se=rllc_se,
            llc_full_se=float(config.n_beta * jackknife_se(full_phi_replicates)))

    def save(self, path: str | Path) -> Path:
        """Write the result into folder ``path`` (safetensors arrays + JSON metadata),
        atomically: an interrupted save never leaves a half-written result."""
        meta = {"format_version": _FORMAT_VERSION, "component_names": self.component_names,
                "dataset_names": self.dataset_names, "sequence_datasets": self.sequence_datasets,
                "llc_full": self.llc_full, "config": self.config, "step": self.step,
                "failed": self.failed, "extra": self.extra}
        arrays = {name: np.atleast_1d(getattr(self, name))  # the floats: llc_full_se, ...
                  for name in _ARRAYS + _OPTIONAL_ARRAYS if getattr(self, name) is not None}
        return write_folder(path, arrays, meta)

    @classmethod
    def load(cls, path: str | Path) -> SusceptibilityResult:
        """Read a result written by :meth:`save`; a damaged or inconsistent folder raises
        :class:`~susc_callback.store.files.ResultFileError` naming it."""
        arrays, meta = read_folder(path)
        version = meta.pop("format_version", None)
        if version not in _READABLE_VERSIONS:
            raise ResultFileError(path, f"unsupported result format {version!r} (this "
                                        f"version reads formats {_READABLE_VERSIONS})")
        check_result_fields(path, meta, arrays, _ARRAYS, _OPTIONAL_ARRAYS)
        for scalar in ("llc_full_se", "full_localisation"):
            if scalar in arrays:
                arrays[scalar] = float(arrays[scalar][0])
        return cls(**meta, **arrays)


def mean_per_dataset(values: np.ndarray, token_dataset: np.ndarray, count: int) -> np.ndarray:
    """``(..., count)``: the mean of ``values`` ``(..., P)`` over each dataset's tokens;
    NaN for a dataset without tokens (the planner warned about it)."""
    means = np.full((*values.shape[:-1], count), np.nan)
    for d in range(count):
        tokens = token_dataset == d
        if tokens.any():
            means[..., d] = values[..., tokens].mean(axis=-1)
    return means


_PER_COMPONENT = ("chi", "chi_covariance", "dataset_chi", "rllc", "mean_phi", "anchor_loss",
                  "loss_traces", "chi_se", "dataset_chi_se", "rllc_se", "probe_traces",
                  "localisation")


def _rows(values: np.ndarray | None, rows: list[int]) -> np.ndarray | None:
    return None if values is None else values[rows]


def merge_results(parts: list[SusceptibilityResult], order: list[str]) -> SusceptibilityResult:
    """One result from estimates of disjoint component subsets on the same probe, config
    and checkpoint (e.g. one per process), with rows in ``order``."""
    if not parts:
        raise ValueError("merge_results needs at least one result")
    first = parts[0]
    row_of = {}
    for part_index, part in enumerate(parts):
        if part.config != first.config or part.step != first.step or not np.array_equal(
                part.token_sequence, first.token_sequence):
            raise ValueError("Cannot merge results of different configs, steps or probes")
        for row, name in enumerate(part.component_names):
            if name in row_of:
                raise ValueError(f"Component {name!r} appears in more than one result")
            row_of[name] = (part_index, row)
    missing = [name for name in order if name not in row_of]
    if missing or len(order) != len(row_of):
        raise ValueError(f"order must name every merged component once; missing {missing}")
    arrays = {key: None if any(getattr(p, key) is None for p in parts) else
              np.stack([getattr(parts[row_of[n][0]], key)[row_of[n][1]] for n in order])
              for key in _PER_COMPONENT}
    halves = None if any(p.chi_halves is None for p in parts) else np.stack(
        [parts[row_of[n][0]].chi_halves[:, row_of[n][1]] for n in order], axis=1)
    failed = {name: reason for part in parts for name, reason in part.failed.items()}
    return replace(first, component_names=list(order), failed=failed, chi_halves=halves,
                   **arrays)
