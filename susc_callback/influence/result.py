"""The influence matrix of one checkpoint, saved as safetensors + JSON.

``influence[k, i, j] = -Cov_k(l_i, l_j)``: the Bayesian influence function (primer
Definition 13) of training row ``i`` on query row ``j`` under posterior ``k`` (the full
localized posterior, or a component's restricted one). Sign: adding ``h l_i`` to the
sampling loss ``L`` (up-weighting training row ``i``) changes the posterior mean of query
``j``'s loss by ``h n_beta influence[k, i, j]`` to first order (fluctuation-dissipation).
A positive entry means the training row *raises* the query's loss; a negative one, that
it lowers it (helps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from susc_callback.store.files import ResultFileError, read_folder, write_folder

LEVELS = ("sequence", "token")
KINDS = ("covariance", "correlation")
_FORMAT = "influence/1"
_ARRAYS = ("influence", "train_variance", "query_variance", "train_mean_loss",
           "query_mean_loss", "draws", "train_rows", "query_rows", "train_index")
_OPTIONAL_ARRAYS = ("train_input_ids", "train_attention_mask", "query_input_ids",
                    "query_attention_mask")
_META = ("posterior_names", "train_level", "query_level", "train_datasets",
         "query_datasets", "config", "step", "failed", "extra")


@dataclass
class InfluenceResult:
    """Influence of I training rows on J query rows under K posteriors.

    Attributes:
        posterior_names: K names: ``"full"`` (the localized posterior) and the components
            whose restricted posteriors were sampled.
        influence: ``(K, I, J)`` ``-Cov(l_i, l_j)`` (NaN for a failed component).
        train_variance, query_variance: ``(K, I)``, ``(K, J)`` each row's loss variance
            (``-train_variance`` is the self-influence).
        train_mean_loss, query_mean_loss: ``(K, I)``, ``(K, J)`` posterior mean losses.
        draws: ``(K,)`` draws pooled into each posterior's moments.
        train_level, query_level: ``"sequence"`` (a row is a sequence's mean token loss)
            or ``"token"`` (a row is one token's loss).
        train_rows, query_rows: ``(I, 2)``, ``(J, 2)`` ``(sequence, position)`` of every
            row; position is -1 for a sequence row, and a token row ``(s, t)`` is the loss
            of predicting token ``t + 1`` of sequence ``s``.
        train_index: ``(S_train,)`` the identity of every training sequence (e.g. its
            index in the training set), so that rows map back to the data.
        train_input_ids, train_attention_mask, query_input_ids, query_attention_mask: the
            sequences (None for models without ``input_ids``).
        train_datasets, query_datasets: a dataset label per sequence.
        config: the SGLD configuration as a dict; step: the checkpoint's training step.
        failed: ``{component: reason}`` for components whose chains diverged.
    """

    posterior_names: list[str]
    influence: np.ndarray
    train_variance: np.ndarray
    query_variance: np.ndarray
    train_mean_loss: np.ndarray
    query_mean_loss: np.ndarray
    draws: np.ndarray
    train_level: str
    query_level: str
    train_rows: np.ndarray
    query_rows: np.ndarray
    train_index: np.ndarray
    train_datasets: list[str]
    query_datasets: list[str]
    config: dict[str, Any]
    step: int | None = None
    failed: dict[str, str] = field(default_factory=dict)
    train_input_ids: np.ndarray | None = None
    train_attention_mask: np.ndarray | None = None
    query_input_ids: np.ndarray | None = None
    query_attention_mask: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def self_influence(self) -> np.ndarray:
        """``(K, I)`` ``BIF(z_i, z_i) = -Var(l_i)``: how strongly each training row's own
        loss responds to it (a Bayesian analogue of a memorisation score)."""
        return -self.train_variance

    def matrix(self, posterior: str = "full", kind: str = "covariance") -> np.ndarray:
        """``(I, J)`` influence under ``posterior``: the covariance form ``-Cov``, or the
        correlation form ``-Corr`` (each entry divided by the two rows' standard deviations;
        NaN where a row's loss did not vary)."""
        k = self._posterior(posterior)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        values = self.influence[k]
        if kind == "correlation":
            scale = np.sqrt(np.outer(self.train_variance[k], self.query_variance[k]))
            with np.errstate(invalid="ignore", divide="ignore"):
                values = np.where(scale > 0, values / scale, np.nan)
        return values

    def sequence_matrix(self, posterior: str = "full") -> np.ndarray:
        """``(S_train, S_query)`` the covariance form with both sides' rows averaged per
        sequence: the influence of a training sequence (the mean of its token losses) on a
        query sequence's mean loss. Exact from token rows, since a covariance is linear in
        each argument; the stored matrix itself for sequence rows."""
        values = self.matrix(posterior)
        for axis, rows, count in ((0, self.train_rows, len(self.train_index)),
                                  (1, self.query_rows, len(self.query_datasets))):
            values = np.moveaxis(_mean_by(np.moveaxis(values, axis, 0), rows[:, 0], count),
                                 0, axis)
        return values

    def top(self, query: int, count: int = 5, posterior: str = "full",
            kind: str = "covariance") -> dict[str, list[tuple[int, float]]]:
        """The training rows that most raise and most lower query row ``query``'s loss:
        ``{"raise": [(row, score), ...], "lower": [...]}``, strongest first."""
        if not 0 <= query < self.influence.shape[2]:
            raise ValueError(f"query row {query} is outside [0, {self.influence.shape[2] - 1}]")
        raising, lowering = strongest(self.matrix(posterior, kind)[:, query], count)
        return {"raise": raising, "lower": lowering}

    def _posterior(self, name: str) -> int:
        if name not in self.posterior_names:
            raise ValueError(f"Unknown posterior {name!r}; this result has "
                             f"{self.posterior_names}")
        if name in self.failed:
            raise ValueError(f"The chains of {name!r} diverged: {self.failed[name]}")
        return self.posterior_names.index(name)

    def save(self, path: str | Path) -> Path:
        """Write into folder ``path`` (safetensors arrays + JSON metadata), atomically."""
        arrays = {name: getattr(self, name) for name in _ARRAYS + _OPTIONAL_ARRAYS
                  if getattr(self, name) is not None}
        meta = {"format": _FORMAT, **{name: getattr(self, name) for name in _META}}
        return write_folder(path, arrays, meta)

    @classmethod
    def load(cls, path: str | Path) -> InfluenceResult:
        """Read a result written by :meth:`save`; a damaged or foreign folder raises
        :class:`~susc_callback.store.files.ResultFileError` naming it."""
        arrays, meta = read_folder(path)
        if meta.pop("format", None) != _FORMAT:
            raise ResultFileError(path, f"not an influence result (format {_FORMAT!r})")
        missing = [k for k in _ARRAYS if k not in arrays] + [k for k in _META if k not in meta]
        unknown = [k for k in arrays if k not in _ARRAYS + _OPTIONAL_ARRAYS] + \
            [k for k in meta if k not in _META]
        if missing or unknown:
            raise ResultFileError(path, f"lacks {missing} / has unexpected {unknown}")
        result = cls(**meta, **arrays)
        k, i, j = result.influence.shape
        shapes = {"train_variance": (k, i), "query_variance": (k, j),
                  "train_mean_loss": (k, i), "query_mean_loss": (k, j), "draws": (k,),
                  "train_rows": (i, 2), "query_rows": (j, 2)}
        wrong = {name: getattr(result, name).shape for name, shape in shapes.items()
                 if getattr(result, name).shape != shape}
        if wrong or len(result.posterior_names) != k:
            raise ResultFileError(path, f"arrays do not fit an influence matrix of shape "
                                        f"{(k, i, j)}: {wrong}")
        return result


def _mean_by(values: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """``(count, ...)``: the mean of ``values`` rows sharing each label."""
    totals = np.zeros((count, *values.shape[1:]))
    np.add.at(totals, labels, values)
    return totals / np.bincount(labels, minlength=count).reshape(-1, *[1] * (values.ndim - 1))


def strongest(scores: np.ndarray, count: int
              ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The ``count`` largest positive and the ``count`` most negative finite entries of
    ``scores``: ``(index, score)`` pairs, strongest first."""
    order = [int(i) for i in np.argsort(scores, kind="stable") if np.isfinite(scores[i])]
    raising = [(i, float(scores[i])) for i in reversed(order) if scores[i] > 0][:count]
    lowering = [(i, float(scores[i])) for i in order if scores[i] < 0][:count]
    return raising, lowering
