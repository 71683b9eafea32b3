"""One result folder on disk: ``arrays.safetensors`` and ``meta.json``, written atomically.

This module knows the file names and nothing about what the arrays mean (that is
:class:`~susc_callback.estimator.results.SusceptibilityResult`'s business), so that the
result can save itself without the run layout above it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save_file

ARRAYS_FILE = "arrays.safetensors"
META_FILE = "meta.json"
CHECKSUM_KEY = "arrays_sha256"
"""Key of ``meta.json`` holding the SHA-256 of ``arrays.safetensors``, so that bytes
changed on disk are found at load time instead of read as other numbers."""
PARTIAL_SUFFIX = ".partial"
"""A folder being written; it is renamed into place when complete and never read."""


class ResultFileError(ValueError):
    """A saved result that cannot be read as written: truncated, damaged or inconsistent.
    The message names the folder and what is wrong."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


def is_result_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a complete result (both files)."""
    path = Path(path)
    return (path / META_FILE).is_file() and (path / ARRAYS_FILE).is_file()


def write_folder(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]
                 ) -> Path:
    """Write ``arrays`` and ``meta`` (with the arrays' checksum) into folder ``path``.
    Written into a sibling folder first and renamed at the end, so an interrupted write
    never leaves a half-written result (a previous result at ``path`` is replaced)."""
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({name: np.ascontiguousarray(value) for name, value in arrays.items()},
              str(partial / ARRAYS_FILE))
    checksum = hashlib.sha256((partial / ARRAYS_FILE).read_bytes()).hexdigest()
    (partial / META_FILE).write_text(json.dumps({**meta, CHECKSUM_KEY: checksum}, indent=2,
                                                allow_nan=True))
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)
    return path


def read_folder(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and metadata of a folder written by :func:`write_folder`, the arrays'
    checksum verified (folders written before checksums were stored are read unverified).
    Raises :class:`ResultFileError` for anything unreadable."""
    path = Path(path)
    if not is_result_folder(path):
        raise FileNotFoundError(f"{path} is not a saved SusceptibilityResult "
                                f"(expected {META_FILE} and {ARRAYS_FILE})")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultFileError(path, f"{META_FILE} is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise ResultFileError(path, f"{META_FILE} holds a {type(meta).__name__}, not an "
                                    "object")
    data = (path / ARRAYS_FILE).read_bytes()
    expected = meta.pop(CHECKSUM_KEY, None)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ResultFileError(path, f"{ARRAYS_FILE} ({len(data)} bytes) does not match the "
                                    f"checksum written with it: the file was changed or "
                                    "damaged after it was saved")
    try:
        arrays = load(data)
    except (SafetensorError, ValueError, OSError) as error:
        raise ResultFileError(path, f"{ARRAYS_FILE} ({len(data)} bytes) is not a readable "
                                    f"safetensors file ({error})") from None
    return arrays, meta
