"""One result folder on disk: ``arrays.safetensors`` and ``meta.json``, written atomically.

This module knows the file names and nothing about what the arrays mean (that is
:class:`~susc_callback.estimator.results.SusceptibilityResult`'s business), so that the
result can save itself without the run layout above it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

ARRAYS_FILE = "arrays.safetensors"
META_FILE = "meta.json"
PARTIAL_SUFFIX = ".partial"
"""A folder being written; it is renamed into place when complete and never read."""


def is_result_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a complete result (both files)."""
    path = Path(path)
    return (path / META_FILE).is_file() and (path / ARRAYS_FILE).is_file()


def write_folder(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]
                 ) -> Path:
    """Write ``arrays`` and ``meta`` into folder ``path``. Written into a sibling folder
    first and renamed at the end, so an interrupted write never leaves a half-written
    result (a previous result at ``path`` is replaced)."""
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({name: np.ascontiguousarray(value) for name, value in arrays.items()},
              str(partial / ARRAYS_FILE))
    (partial / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=True))
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)
    return path


def read_folder(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and metadata of a folder written by :func:`write_folder`."""
    path = Path(path)
    if not is_result_folder(path):
        raise FileNotFoundError(f"{path} is not a saved SusceptibilityResult "
                                f"(expected {META_FILE} and {ARRAYS_FILE})")
    return load_file(str(path / ARRAYS_FILE)), json.loads((path / META_FILE).read_text())
