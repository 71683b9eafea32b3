"""``estimate_influence``: the influence matrix from the engine's draws, streamed.

The training samples and the queries are evaluated together as one probe set at every
draw of every chain (the engine's probe machinery: prefix replay, stacking, forked
workers), and the draws go into float64 cross-moments
(:class:`~susc_callback.estimator.moments.LossCrossMoments`) instead of being stored, so
memory is O(train rows x query rows) whatever the number of draws. The full chain gives
the influence under the localized posterior; each named component's chains, under its
restricted posterior.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from susc_callback.components.resolve import resolve_components
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.data.sampling import LossFn
from susc_callback.estimator.checks import check_fits_model
from susc_callback.estimator.engine import Draws, sample_draws
from susc_callback.estimator.moments import LossCrossMoments, TokenRows
from susc_callback.estimator.plan import FULL
from susc_callback.influence.result import LEVELS, InfluenceResult


def estimate_influence(
    model: nn.Module,
    train: Any,
    queries: Any,
    config: SGLDConfig | None = None,
    *,
    components: Any = None,
    train_level: str = "sequence",
    query_level: str = "token",
    sampling_data: Any = None,
    train_index: Sequence[int] | None = None,
    max_bytes: int | None = None,
    loss_fn: LossFn | None = None,
    collate_fn: Callable | None = None,
    step: int | None = None,
) -> InfluenceResult:
    """Influence ``-Cov(l_i, l_j)`` of every training row on every query row.

    Args:
        model: any ``nn.Module`` at the checkpoint; never modified.
        train: the training samples whose influence is measured: a :class:`ProbeSet`, an
            ``(S, T)`` token-id tensor or a dict of tensors with one row per sample.
        queries: the query samples, in the same forms.
        config: SGLD settings (default :class:`SGLDConfig`).
        components: None for the localized posterior alone, or components (any form
            ``estimate_susceptibilities`` takes) whose restricted posteriors are sampled
            too: the influence "as seen through" each component.
        train_level, query_level: ``"sequence"`` (a row is a sequence's mean token loss)
            or ``"token"`` (one row per token).
        sampling_data: what SGLD samples with (default: ``train``).
        train_index: the identity of every training sample (default ``0 .. S-1``).
        max_bytes: refuse, before sampling, when the running sums would need more memory
            (default: half the device's memory).
        loss_fn, collate_fn: as for ``estimate_susceptibilities``.
        step: training step of the checkpoint, stored in the result.
    """
    config = config or SGLDConfig()
    for name, level in (("train_level", train_level), ("query_level", query_level)):
        if level not in LEVELS:
            raise ValueError(f"{name} must be one of {LEVELS}, got {level!r}")
    train, queries = _as_probe(train, "train"), _as_probe(queries, "queries")
    for what, probe in (("train", train), ("queries", queries)):
        check_fits_model(model, probe.batch(0, len(probe), torch.device("cpu")), what)
    index = np.arange(len(train)) if train_index is None else np.asarray(train_index)
    if index.shape != (len(train),) or index.dtype.kind not in "iu":
        raise ValueError(f"train_index must hold one integer per training sample "
                         f"({len(train)}), got shape {index.shape} of {index.dtype}")
    combined = _concatenate(train, queries)
    posteriors = [] if components is None else components
    layout: dict[str, Any] = {}

    def moments(token_sequence: np.ndarray, token_position: np.ndarray,
                device: torch.device) -> Callable[[], LossCrossMoments]:
        sides = [_side_rows(token_sequence, token_position, rows, level, what)
                 for rows, level, what in ((range(len(train)), train_level, "training"),
                                           (range(len(train), len(combined)), query_level,
                                            "query"))]
        layout["train"], layout["query"] = sides
        _check_memory(sides[0][0].count, sides[1][0].count, layout["posteriors"], config,
                      max_bytes)
        return lambda: LossCrossMoments(sides[0][0], sides[1][0], device)

    layout["posteriors"] = 1 + len(resolve_components(model, posteriors, allow_none=True))
    draws = sample_draws(model, posteriors, sampling_data if sampling_data is not None
                         else train.tensors, combined, config, loss_fn=loss_fn,
                         collate_fn=collate_fn, moments=moments)
    query_rows = layout["query"][1].copy()
    query_rows[:, 0] -= len(train)
    return _result(draws, layout["train"][1], query_rows, train, queries, index,
                   train_level, query_level, config, step)


def _as_probe(value: Any, what: str) -> ProbeSet:
    if isinstance(value, ProbeSet):
        return value
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        raise ValueError(f"{what} is empty: pass at least one sequence")
    if isinstance(value, torch.Tensor):
        return ProbeSet.from_tensors(value, datasets=what)
    if isinstance(value, dict):
        return ProbeSet.from_batch(value, datasets=what)
    raise TypeError(f"{what} must be a ProbeSet, a token-id tensor or a dict of tensors, got "
                    f"{type(value).__name__}")


def _concatenate(train: ProbeSet, queries: ProbeSet) -> ProbeSet:
    """One probe set: the training sequences, then the queries (right-padded and masked
    to a common length when their lengths differ)."""
    keys = [set(p.tensors) - {"attention_mask"} for p in (train, queries)]
    if keys[0] != keys[1]:
        raise ValueError(f"train and queries hold different inputs: {sorted(train.tensors)} "
                         f"vs {sorted(queries.tensors)}")
    parts = [dict(train.tensors), dict(queries.tensors)]
    if "input_ids" in train.tensors:
        width = max(p["input_ids"].shape[1] for p in parts)
        for part in parts:
            ids = part["input_ids"]
            mask = part.get("attention_mask", torch.ones_like(ids))
            pad = width - ids.shape[1]
            part["input_ids"] = torch.nn.functional.pad(ids, (0, pad))
            part["attention_mask"] = torch.nn.functional.pad(mask, (0, pad))
    try:
        tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    except RuntimeError as error:
        raise ValueError(f"train and queries cannot be stacked into one batch: {error}"
                         ) from None
    return ProbeSet.from_batch(tensors, train.datasets + queries.datasets)


def _side_rows(token_sequence: np.ndarray, token_position: np.ndarray, sequences: range,
               level: str, what: str) -> tuple[TokenRows, np.ndarray]:
    """The probe tokens of ``sequences`` grouped into rows, and each row's (sequence,
    position)."""
    tokens = np.flatnonzero((token_sequence >= sequences.start)
                            & (token_sequence < sequences.stop))
    seen = np.unique(token_sequence[tokens])
    if len(seen) < len(sequences):
        empty = sorted(set(sequences) - set(seen.tolist()))
        raise ValueError(f"{what} sequences {[s - sequences.start for s in empty][:10]} have "
                         f"no valid target token (too short, or fully masked)")
    if level == "token":
        rows = np.stack([token_sequence[tokens], token_position[tokens]], axis=1)
        return TokenRows(tokens, np.arange(len(tokens)), len(tokens)), rows
    rows = np.stack([np.array(sequences), np.full(len(sequences), -1)], axis=1)
    return TokenRows(tokens, token_sequence[tokens] - sequences.start, len(sequences)), rows


def _check_memory(train_rows: int, query_rows: int, posteriors: int, config: SGLDConfig,
                  max_bytes: int | None) -> None:
    copies = config.workers if isinstance(config.workers, int) else \
        min(config.num_chains, torch.get_num_threads())
    need = LossCrossMoments.nbytes(train_rows, query_rows) * posteriors * max(copies, 1)
    limit = max_bytes if max_bytes is not None else _memory(config) // 2
    if need > limit:
        raise ValueError(
            f"The influence matrix has {train_rows} x {query_rows} entries per posterior "
            f"({posteriors} posterior(s), {max(copies, 1)} process(es)): {need / 2**30:.2f} "
            f"GiB of float64 sums, over the limit of {limit / 2**30:.2f} GiB. Aggregate "
            "(train_level / query_level='sequence'), pass fewer training samples or "
            "queries (e.g. the queries in chunks, one call each), or raise max_bytes")


def _memory(config: SGLDConfig) -> int:
    device = torch.device(config.device) if config.device else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _result(draws: Draws, train_rows: np.ndarray, query_rows: np.ndarray, train: ProbeSet,
            queries: ProbeSet, index: np.ndarray, train_level: str, query_level: str,
            config: SGLDConfig, step: int | None) -> InfluenceResult:
    names = [FULL, *draws.names]
    i, j = len(train_rows), len(query_rows)
    fields = {"influence": (i, j), "train_variance": (i,), "query_variance": (j,),
              "train_mean_loss": (i,), "query_mean_loss": (j,)}
    arrays = {key: np.full((len(names), *shape), np.nan) for key, shape in fields.items()}
    counts = np.zeros(len(names), dtype=np.int64)
    for k, name in enumerate(names):
        if name in draws.failed:
            continue
        moments = draws.sums[name].moments
        arrays["influence"][k] = -moments.covariance()
        arrays["train_variance"][k], arrays["query_variance"][k] = moments.variances()
        arrays["train_mean_loss"][k], arrays["query_mean_loss"][k] = moments.means()
        counts[k] = moments.count
    ids = lambda probe, key: None if probe.tensors.get(key) is None else \
        probe.tensors[key].numpy()  # noqa: E731
    return InfluenceResult(
        posterior_names=names, draws=counts, train_level=train_level,
        query_level=query_level, train_rows=train_rows.astype(np.int64),
        query_rows=query_rows.astype(np.int64), train_index=index.astype(np.int64),
        train_datasets=list(train.datasets), query_datasets=list(queries.datasets),
        config=config.to_dict(), step=step, failed=dict(draws.failed),
        train_input_ids=ids(train, "input_ids"),
        train_attention_mask=ids(train, "attention_mask"),
        query_input_ids=ids(queries, "input_ids"),
        query_attention_mask=ids(queries, "attention_mask"), **arrays)
