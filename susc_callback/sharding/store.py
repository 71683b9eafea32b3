"""Chain shards on disk, beside a run's results, so that a sharded analysis can resume.

::

    RUN/susceptibility/shards/step-{N}/chain-{K}/   one ChainShard (arrays + meta.json)

Each shard is written atomically (:func:`~susc_callback.store.files.write_folder`: into a
``.partial`` folder, renamed when complete), so a killed process leaves complete shards
and never a half-written one that could be read. Every shard records the *fingerprint* of
what it estimates (settings, components, probe, sampling data, checkpoint files); a shard
with another fingerprint is refused with the differences named, never mixed in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from susc_callback.sharding.plan import WorkUnit
from susc_callback.sharding.shard import ChainShard
from susc_callback.store.files import ResultFileError, is_result_folder, read_folder, write_folder
from susc_callback.store.run import RunStore

SHARDS_FOLDER = "shards"
_ANCHOR = "anchor"
_LAYOUT = ("token_sequence", "token_position")


class ShardMismatchError(ValueError):
    """Shards on disk were computed for another estimate than the one asked for."""


class ShardStore:
    """The chain shards of a run's results store (``results.root / "shards"``)."""

    def __init__(self, results: RunStore) -> None:
        self.root = results.root / SHARDS_FOLDER

    def folder(self, unit: WorkUnit) -> Path:
        return self.root / f"step-{unit.step}" / f"chain-{unit.chain}"

    def write(self, step: int, shard: ChainShard, fingerprint: dict[str, Any]) -> Path:
        """Save ``shard`` of the estimate at ``step`` (replacing one that was there)."""
        arrays = {f"{name}/{key}": value for name, fields in shard.sums.items()
                  for key, value in fields.items()}
        arrays.update(token_sequence=shard.token_sequence, token_position=shard.token_position)
        if shard.anchor is not None:
            arrays[_ANCHOR] = np.asarray(shard.anchor)
        meta = {"fingerprint": fingerprint, "chain": shard.chain, "names": shard.names,
                "failed": shard.failed, "kappa": shard.kappa, "spacing": shard.spacing}
        return write_folder(self.folder(WorkUnit(step, shard.chain)), arrays, meta)

    def read(self, unit: WorkUnit) -> ChainShard:
        """The shard of ``unit``; :class:`ResultFileError` if it is damaged."""
        arrays, meta = read_folder(self.folder(unit))
        sums: dict[str, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            if "/" in key:
                name, field = key.rsplit("/", 1)
                sums.setdefault(name, {})[field] = value
        return ChainShard(meta["chain"], meta["names"], sums, meta["failed"],
                          *(arrays[key] for key in _LAYOUT), arrays.get(_ANCHOR),
                          meta["kappa"], meta["spacing"])

    def is_done(self, unit: WorkUnit, fingerprint: dict[str, Any]) -> bool:
        """Whether ``unit`` has a complete, readable shard of the estimate ``fingerprint``.
        A damaged one is not done (it is computed again); one of another estimate raises
        :class:`ShardMismatchError`, naming what differs."""
        folder = self.folder(unit)
        if not is_result_folder(folder):
            return False
        try:
            _, meta = read_folder(folder)
        except ResultFileError:
            return False
        differences = fingerprint_differences(meta.get("fingerprint", {}), fingerprint)
        if differences:
            raise ShardMismatchError(
                f"{folder} was computed for another estimate than this one: "
                f"{'; '.join(differences)}. Run with the same settings to resume, --force to "
                f"discard the shards and recompute, or --out DIR for a new series")
        return True

    def clear(self, step: int) -> None:
        """Remove the shards of ``step`` (once its result is saved, or to recompute it)."""
        shutil.rmtree(self.root / f"step-{step}", ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


def fingerprint_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"what: saved (now value)"`` for every entry of two fingerprints that differs
    (settings field by field)."""
    now = json.loads(json.dumps(now))  # as it reads back from meta.json
    differences = []
    for key, value in now.items():
        before = saved.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            differences += [f"{key}.{name}={before.get(name)!r} (now {item!r})"
                            for name, item in value.items() if before.get(name) != item]
        elif before != value:
            differences.append(f"{key} {before!r} (now {value!r})")
    return differences
