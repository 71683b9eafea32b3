"""What a loaded :class:`~.results.SusceptibilityResult` must satisfy: every field present
and every array's shape agreeing with the names and with the other arrays, so that a
damaged or hand-edited result folder is refused with its path instead of giving wrong
numbers (e.g. a correlation over the wrong rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from susc_callback.store.files import ResultFileError

META_FIELDS = ("component_names", "dataset_names", "sequence_datasets", "llc_full", "config",
               "step", "failed", "extra")


def check_result_fields(path: str | Path, meta: dict[str, Any], arrays: dict[str, np.ndarray],
                        array_names: tuple[str, ...], optional: tuple[str, ...]) -> None:
    """Raise :class:`ResultFileError` naming ``path`` unless ``meta`` and ``arrays`` (the
    ``array_names``, and any of the ``optional`` ones) form one consistent result."""
    def fail(problem: str) -> None:
        raise ResultFileError(path, problem)

    for what, have, wanted, allowed in (("meta.json", meta, META_FIELDS, ()),
                                        ("arrays.safetensors", arrays, array_names, optional)):
        missing = [key for key in wanted if key not in have]
        unknown = [key for key in have if key not in wanted + allowed]
        if missing or unknown:
            fail(f"{what} lacks {missing} / has unexpected {unknown}")
    for key in ("component_names", "dataset_names", "sequence_datasets"):
        if not isinstance(meta[key], list) or not all(isinstance(x, str) for x in meta[key]):
            fail(f"{key} must be a list of strings, got {meta[key]!r:.80}")
    names = meta["component_names"]
    if len(set(names)) != len(names):
        fail(f"component_names repeat a name: {names}")
    if not isinstance(meta["failed"], dict) or not set(meta["failed"]) <= set(names):
        fail(f"failed names components that the result does not hold: {meta['failed']!r:.80}")
    if meta["step"] is not None and not isinstance(meta["step"], int):
        fail(f"step must be an integer or null, got {meta['step']!r}")
    if not isinstance(meta["config"], dict):
        fail(f"config must be an object, got {meta['config']!r:.80}")
    if not set(meta["sequence_datasets"]) <= set(meta["dataset_names"]):
        fail("sequence_datasets name datasets missing from dataset_names")

    components, datasets = len(names), len(meta["dataset_names"])
    tokens = arrays["token_sequence"].shape[0] if arrays["token_sequence"].ndim == 1 else -1
    sequences = len(meta["sequence_datasets"])
    ids = arrays["probe_input_ids"]
    positions = ids.shape[1] if ids.ndim == 2 else -1
    traces = arrays["loss_traces"].shape[1:]
    expected = {"chi": (components, tokens), "chi_covariance": (components, tokens),
                "chi_se": (components, tokens), "dataset_chi_se": (components, datasets),
                "rllc_se": (components,), "llc_full_se": (1,),
                "dataset_chi": (components, datasets),
                "rllc": (components,), "mean_phi": (components,),
                "anchor_loss": (components,), "loss_traces": (components, *traces),
                "full_loss_trace": traces, "probe_traces": (components, *traces),
                "full_probe_trace": traces, "chi_halves": (2, components, tokens),
                "localisation": (components,), "full_localisation": (1,),
                "token_sequence": (tokens,),
                "token_position": (tokens,), "probe_input_ids": (sequences, positions),
                "probe_attention_mask": (sequences, positions)}
    if len(traces) != 2:
        fail(f"loss_traces has shape {arrays['loss_traces'].shape}; it must be (components, "
             "chains, draws)")
    for key, shape in expected.items():
        if key in arrays and arrays[key].shape != shape:
            fail(f"{key} has shape {arrays[key].shape}, but {components} component names, "
                 f"{datasets} dataset names, {sequences} probe sequences and "
                 f"{tokens} probe tokens make it {shape}")
    sequence, position = arrays["token_sequence"], arrays["token_position"]
    if tokens and (sequence.min() < 0 or sequence.max() >= sequences):
        fail(f"token_sequence points outside the {sequences} probe sequences")
    if tokens and positions > 0 and (position.min() < 0 or position.max() >= positions - 1):
        fail(f"token_position points outside positions 0..{positions - 2} of the probe")
