"""The rows (samples) of a batch: how many, and the same rows of every tensor in it.

A batch is any nesting of dicts, tuples, lists and namedtuples of tensors; a tensor belongs
to the batch's rows when its leading dimension is the number of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def batch_rows(batch: Mapping[str, object]) -> int | None:
    """Samples in a batch: the leading dimension of ``input_ids``, else the most common
    leading dimension of its tensors (None if it has none)."""
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim():
        return ids.shape[0]
    sizes = [v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()]
    return max(sizes, key=sizes.count) if sizes else None


def select_rows(value: object, rows: int, start: int, size: int) -> object:
    """Rows ``start:start + size`` of every tensor in ``value`` whose leading dimension is
    ``rows`` (through tuples, lists and dicts; anything else unchanged)."""
    return _map_rows(value, rows, lambda tensor: tensor[start:start + size])


def take_rows(value: object, rows: int, indices: torch.Tensor) -> object:
    """Rows ``indices`` of every tensor in ``value`` whose leading dimension is ``rows``."""
    return _map_rows(value, rows, lambda tensor: tensor.index_select(0, indices.to(tensor.device)))


def repeat_rows(value: object, rows: int, count: int) -> object:
    """Every tensor in ``value`` whose leading dimension is ``rows``, repeated ``count``
    times along it (copy ``j`` is rows ``j * rows`` to ``(j + 1) * rows - 1``)."""
    return _map_rows(value, rows,
                     lambda tensor: tensor.repeat(count, *([1] * (tensor.dim() - 1))))


def _map_rows(value: object, rows: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    if isinstance(value, torch.Tensor):
        return fn(value) if value.dim() and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {key: _map_rows(item, rows, fn) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_map_rows(item, rows, fn) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_rows(item, rows, fn) for item in value)
    return value
