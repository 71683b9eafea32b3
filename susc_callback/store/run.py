"""The layout of a run on disk, and the only module that knows it.

::

    RUN/                         the Trainer's output_dir (or any folder of checkpoints)
      checkpoint-{N}/            a training checkpoint (Trainer layout)
        susceptibility/          a copy of the result of step N, when N was a snapshot
      runs/susceptibility/       the TensorBoard run where no Trainer names one
      susceptibility/            the run's results: a RunStore
        step-{N}/                one result (:mod:`susc_callback.store.files`)
        orphaned/{time}/step-{N} results set aside on resume (after the resumed step)
        .lock                    held by the one process writing results (RunStore.writing)
      influence/                 the run's influence matrices: a RunStore of the same
        step-{N}/                layout, holding InfluenceResult folders
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from susc_callback.config import SGLDConfig
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.store.files import PARTIAL_SUFFIX, ResultFileError, is_result_folder

RESULTS_FOLDER = "susceptibility"
INFLUENCE_FOLDER = "influence"
LOCK_FILE = ".lock"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
OnDamaged = Callable[[int, ResultFileError], None]
"""Called with the step and the error of a damaged result that is left out of a series."""


class RunStore:
    """The results of one run, one folder per training step, under ``root``.

    ``result_type`` is the class results are read as (anything with ``save(path)``, a
    ``step`` attribute and ``load(path)``): :class:`SusceptibilityResult` by default, or
    :class:`~susc_callback.influence.InfluenceResult` for the influence store."""

    def __init__(self, root: str | Path, result_type: type = SusceptibilityResult) -> None:
        self.root, self.result_type = Path(root), result_type

    @classmethod
    def of_run(cls, run_dir: str | Path, folder: str = RESULTS_FOLDER,
               result_type: type = SusceptibilityResult) -> RunStore:
        """The store of the run in ``run_dir`` (``run_dir/susceptibility``, or another
        ``folder`` such as ``influence`` with its ``result_type``)."""
        return cls(Path(run_dir) / folder, result_type)

    def step_dir(self, step: int) -> Path:
        """Where the result of ``step`` lives."""
        return self.root / f"step-{step}"

    def saved_steps(self) -> dict[int, Path]:
        """``{step: folder}`` of the complete saved results, in step order."""
        found = {}
        if self.root.is_dir():
            for path in self.root.iterdir():
                match = _STEP_DIR.match(path.name)
                if match and is_result_folder(path):
                    found[int(match.group(1))] = path
        return dict(sorted(found.items()))

    def has(self, step: int) -> bool:
        return is_result_folder(self.step_dir(step))

    def save(self, result: Any) -> Path:
        """Write ``result`` at its step (replacing what was there), atomically."""
        if result.step is None:
            raise ValueError("A result needs its training step to be stored in a run")
        return result.save(self.step_dir(result.step))

    def load(self, step: int) -> Any:
        return self.result_type.load(self.step_dir(step))

    def load_all(self, up_to: int | None = None, on_damaged: OnDamaged | None = None
                 ) -> list[Any]:
        """Every saved result in step order (those at steps <= ``up_to``). A damaged one
        raises :class:`ResultFileError`, or is left out after ``on_damaged(step, error)``."""
        results = []
        for step, path in self.saved_steps().items():
            if up_to is not None and step > up_to:
                continue
            try:
                results.append(self.result_type.load(path))
            except ResultFileError as error:
                if on_damaged is None:
                    raise
                on_damaged(step, error)
        return results

    def set_aside(self, steps: list[int]) -> Path:
        """Move the results of ``steps`` to ``orphaned/{time}`` (kept, out of the series);
        returns that folder."""
        target = self.root / "orphaned" / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True, exist_ok=True)
        for step in steps:
            shutil.move(str(self.step_dir(step)), str(target / f"step-{step}"))
        return target

    def copy_into_checkpoint(self, step: int, output_dir: str | Path,
                             only_if_missing: bool = False) -> None:
        """Copy the result of ``step`` into ``output_dir/checkpoint-{step}``, if both exist,
        so that a checkpoint carries its own susceptibilities. Atomic: copied beside the
        target and renamed, so a kill mid-copy leaves no partial copy (``only_if_missing``:
        keep a complete copy that is there already, e.g. when repairing after a resume)."""
        source, checkpoint = self.step_dir(step), checkpoint_dir(output_dir, step)
        target = checkpoint / RESULTS_FOLDER
        if not (is_result_folder(source) and checkpoint.is_dir()) or (
                only_if_missing and is_result_folder(target)):
            return
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)

    @contextmanager
    def writing(self, wait_seconds: float = 0.0) -> Iterator[None]:
        """Hold the run's write lock (``ROOT/.lock``): one writer of results and TensorBoard
        events at a time. Another holder makes this wait up to ``wait_seconds``, then raise
        :class:`RunInUseError`. The operating system releases the lock of a process that
        dies, so a killed run never leaves the store locked."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.root / LOCK_FILE, timeout=wait_seconds)
        try:
            lock.acquire()
        except Timeout:
            raise RunInUseError(
                f"{self.root} is being written by another process (a `susc analyze` or a "
                "training run with SusceptibilityCallback on the same run directory); wait "
                "for it to finish, or write to another directory") from None
        try:
            yield
        finally:
            lock.release()


class RunInUseError(RuntimeError):
    """Another process holds the write lock of a run's store."""


def check_same_settings(result: SusceptibilityResult, config: SGLDConfig,
                        components: list[str], path: str | Path,
                        remedy: str = "resume with the same settings, or write to a new "
                                      "output directory") -> None:
    """Refuse to mix, in one series, a saved result computed with other components or with
    other values of the fields that define the estimate (``SGLDConfig.estimate_settings``;
    fields that only say how it is run, e.g. ``workers``, may differ). The error names
    every difference, then ``remedy``."""
    differences = settings_differences(result.config, config)
    if list(result.component_names) != list(components):
        differences.append(f"components {_names(result.component_names)} (now "
                           f"{_names(components)})")
    if differences:
        raise ValueError(f"The saved snapshot {path} was computed with other components or SGLD "
                         f"settings than this run's: {'; '.join(differences)}. One series "
                         f"shares them: {remedy}")


def settings_differences(saved: dict, config: SGLDConfig) -> list[str]:
    """``"name=saved (now value)"`` for every field that defines the estimate
    (``SGLDConfig.estimate_settings``) and differs between a saved config and ``config``."""
    return [f"{name}={saved.get(name)!r} (now {value!r})"
            for name, value in config.estimate_settings().items() if saved.get(name) != value]


def check_one_series(results: list[SusceptibilityResult], remedy: str) -> None:
    """Refuse results that cannot be one series: other settings, components or probe than
    the first (e.g. a store that was written by two analyses)."""
    first = results[0]
    config = SGLDConfig.from_dict(first.config)
    for result in results[1:]:
        where = f"step {result.step}" if result.step is not None else "a result"
        check_same_settings(result, config, first.component_names,
                            f"({where}, against step {first.step})", remedy)
        check_same_probe(result, first.probe_input_ids, f"({where})", remedy)


def _names(names: list[str]) -> str:
    return str(list(names)) if len(names) <= 4 else f"[{', '.join(names[:3])}, ... " \
        f"({len(names)} in all)]"


def check_same_probe(result: SusceptibilityResult, probe_input_ids: np.ndarray,
                     path: str | Path, remedy: str) -> None:
    """Refuse to mix results computed on another probe set."""
    if not np.array_equal(result.probe_input_ids, probe_input_ids):
        raise ValueError(f"{path} was computed on another probe set "
                         f"({result.probe_input_ids.shape[0]} sequences x "
                         f"{result.probe_input_ids.shape[1]} tokens, now "
                         f"{probe_input_ids.shape[0]} x {probe_input_ids.shape[1]} or other "
                         f"tokens); {remedy}")


def default_log_dir(run_dir: str | Path) -> Path:
    """The TensorBoard run of ``run_dir``'s susceptibilities when no Trainer names one
    (``susc analyze``, a callback not bound to its Trainer)."""
    return Path(run_dir) / "runs" / RESULTS_FOLDER


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The Trainer's folder of the checkpoint at ``step``."""
    return Path(output_dir) / f"checkpoint-{step}"


def find_checkpoints(run_dir: str | Path, explicit: list[str] | None = None) -> dict[int, Path]:
    """``{step: checkpoint folder}`` in step order: the ``checkpoint-{N}`` folders of
    ``run_dir``, or the folders ``explicit`` names (paths, or names inside ``run_dir``)."""
    run_dir = Path(run_dir)
    if explicit:
        found = {}
        for name in explicit:
            path = Path(name) if Path(name).is_dir() else run_dir / name
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint {name} not found (looked in {path})")
            found[checkpoint_step(path)] = path
        return dict(sorted(found.items()))
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    found = {int(m.group(1)): p for p in run_dir.iterdir()
             if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))}
    if not found:
        raise FileNotFoundError(f"no checkpoints found: looked for checkpoint-<step> folders "
                                f"in {run_dir.resolve()}; pass --checkpoints to name them")
    return dict(sorted(found.items()))


def training_losses(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, losses)`` of the training loss logged by the Trainer, from the
    ``trainer_state.json`` of the run (its own, else its latest checkpoint's); None when
    the run has none."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "trainer_state.json"]
    if run_dir.is_dir():
        checkpoints = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                             if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name)))
        candidates += [p / "trainer_state.json" for _, p in reversed(checkpoints)]
    for path in candidates:
        if path.is_file():
            try:
                history = json.loads(path.read_text()).get("log_history", [])
            except (json.JSONDecodeError, AttributeError):
                continue
            points = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
            if points:
                steps, losses = zip(*points)
                return np.array(steps, dtype=np.int64), np.array(losses, dtype=np.float64)
    return None


def checkpoint_step(path: str | Path) -> int:
    """The training step of a checkpoint folder: from its name, else its trainer state."""
    path = Path(path)
    match = _CHECKPOINT_DIR.match(path.name)
    if match:
        return int(match.group(1))
    state = path / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    raise ValueError(f"cannot tell the training step of {path}: name it checkpoint-<step> "
                     "or keep its trainer_state.json")


def load_results(source: str | Path, on_damaged: OnDamaged | None = None
                 ) -> list[SusceptibilityResult]:
    """One saved result, or every result of a run (``RUN/susceptibility/step-*``) or of a
    store (``.../susceptibility``), in step order; ``on_damaged`` as in
    :meth:`RunStore.load_all`."""
    source = Path(source)
    for single in (source, source / RESULTS_FOLDER):  # a result, or a checkpoint's copy
        if is_result_folder(single):
            return [SusceptibilityResult.load(single)]
    for store in (RunStore.of_run(source), RunStore(source)):
        results = store.load_all(on_damaged=on_damaged)
        if results:
            return results
    raise FileNotFoundError(f"no saved results in {source} (looked for a result folder, "
                            f"{source / RESULTS_FOLDER}/step-* and {source}/step-*)")

