"""``susc analyze``: estimate every checkpoint of a run, in one process or in many.

The work is one unit per (checkpoint, chain) (:mod:`susc_callback.sharding.plan`). Under
``torchrun`` or ``accelerate launch`` every rank computes a contiguous share of the units
still to do and writes each chain's sums as a shard (:class:`~susc_callback.sharding.
ShardStore`); the main rank merges the shards of each checkpoint into its result, saves it
and rebuilds the TensorBoard run. One process does the same with a world of one. Shards
outlive a killed or pre-empted job, so the same command run again computes only the
missing ones. The main rank holds the run's write lock for the whole job, so a second
analysis of the same run directory is refused instead of mixed in.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from transformers.utils import logging as hf_logging

from susc_callback.cli.common import (
    CommandError,
    load_model,
    load_tokenizer,
    sgld_config,
    skip_damaged,
)
from susc_callback.cli.launch import Processes, launched_processes
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet, probe_token_texts
from susc_callback.estimator.engine import ChainDivergedError
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.logging.snapshots import SnapshotPublisher
from susc_callback.sharding import ShardStore, WorkUnit, collectives, estimate_chains
from susc_callback.sharding.collectives import on_every_rank, on_main
from susc_callback.sharding.estimate import merged_result
from susc_callback.sharding.plan import by_step, rank_share, work_units
from susc_callback.store.files import ResultFileError
from susc_callback.store.run import (
    RunInUseError,
    RunStore,
    check_same_probe,
    check_same_settings,
    default_log_dir,
    find_checkpoints,
)

SERIES_REMEDY = ("use the same flags, --force to recompute every checkpoint of the series, or "
                 "--out DIR to start a new series")


def analyze(args: argparse.Namespace) -> int:
    checkpoints = find_checkpoints(args.run_dir, args.checkpoints)
    out = Path(args.out) if args.out else Path(args.run_dir)
    store = RunStore.of_run(out)
    with launched_processes() as processes, _locked_by_main(store, processes):
        return _analyze(args, store, checkpoints, out, processes)


@contextmanager
def _locked_by_main(store: RunStore, processes: Processes) -> Iterator[None]:
    """The run's write lock, held by the main rank for the whole job (every rank raises
    :class:`RunInUseError` when another job holds it)."""
    with ExitStack() as held:
        refused = None
        if processes.main:
            try:
                held.enter_context(store.writing())
            except RunInUseError as error:
                refused = str(error)
        refused = collectives.broadcast_from_main(refused)
        if refused is not None:
            raise RunInUseError(refused)
        yield


def _analyze(args: argparse.Namespace, store: RunStore, checkpoints: dict[int, Path],
             out: Path, processes: Processes) -> int:
    """Compute this rank's share of the missing shards; on the main rank, merge and save
    every finished checkpoint and rebuild the TensorBoard run, while the others wait for
    its outcome (so that all ranks end together, with its status)."""
    if args.no_progress or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars
    analysis = on_every_rank(lambda: _Analysis.of(args, store, checkpoints, processes))
    todo = on_main(lambda: _steps_to_compute(analysis, args))
    analysis.fingerprints = on_main(
        lambda: {step: analysis.fingerprint(step) for step in todo})
    pending = on_main(analysis.pending)
    failed = on_every_rank(lambda: analysis.compute(
        rank_share(pending, processes.rank, processes.world), args.keep_going))
    failures = [failure for part in collectives.all_gather(failed) for failure in part]
    return on_main(lambda: _finish(analysis, args, todo, out, failures))


def _finish(analysis: _Analysis, args: argparse.Namespace, todo: set[int], out: Path,
            failures: list[str]) -> int:
    """Main rank: save every checkpoint whose shards are complete, rebuild the TensorBoard
    run and say what failed; the exit status."""
    store = analysis.store
    for step in analysis.checkpoints:
        if step not in todo:
            print(f"step {step}: done already ({store.step_dir(step)})")
        else:  # complete shards left by an earlier run, or by the other ranks
            analysis.save_merged(step)
    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir(out)
    publisher = SnapshotPublisher(store, log_dir, args.n_pcs, args.standardization)
    try:
        publisher.rebuild(skip_damaged if args.keep_going else None)
    finally:
        publisher.close()
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    if failures:
        print("failed checkpoints:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


@dataclass
class _Analysis:
    """What every rank of one ``susc analyze`` shares: its inputs, the run's stores and
    the fingerprint of each checkpoint's estimate (:meth:`fingerprint`)."""

    store: RunStore
    shards: ShardStore
    checkpoints: dict[int, Path]
    tokenizer: Any
    probe: ProbeSet
    sampling: ProbeSet
    config: SGLDConfig
    components: str
    processes: Processes
    fingerprints: dict[int, dict] = field(default_factory=dict)

    @classmethod
    def of(cls, args: argparse.Namespace, store: RunStore, checkpoints: dict[int, Path],
           processes: Processes) -> _Analysis:
        tokenizer = load_tokenizer(args.tokenizer, Path(args.run_dir), checkpoints)
        probe = ProbeSet.from_jsonl(args.probe, tokenizer, max_length=args.max_length)
        sampling = ProbeSet.from_jsonl(args.sampling_data, tokenizer,
                                       max_length=args.max_length, what="sampling data")
        config = sgld_config(args)
        if processes.device is not None and config.device is None:
            config = config.replace(device=str(processes.device))
        return cls(store, ShardStore(store), checkpoints, tokenizer, probe, sampling, config,
                   args.components or "heads", processes)

    def fingerprint(self, step: int) -> dict[str, Any]:
        """What a shard of ``step`` estimates: the settings that define the estimate, the
        components, the probe and sampling data (digests) and the checkpoint's files
        (names, sizes, modification times)."""
        folder = self.checkpoints[step]
        files = {path.name: [path.stat().st_size, path.stat().st_mtime_ns]
                 for path in sorted(folder.iterdir()) if path.is_file()}
        return {"settings": self.config.estimate_settings(), "components": self.components,
                **self.data_digests, "checkpoint": {"folder": folder.name, "files": files}}

    @cached_property
    def data_digests(self) -> dict[str, str]:
        """Digests of the probe and sampling data, the same for every checkpoint."""
        return {"probe": _digest(self.probe), "sampling_data": _digest(self.sampling)}

    @cached_property
    def probe_texts(self) -> list[list[str]] | None:
        """The probe tokens' texts every saved result carries."""
        return probe_token_texts(self.probe, self.tokenizer)

    def pending(self) -> list[WorkUnit]:
        """The units of the steps to do without a shard of this estimate on disk."""
        return [unit for unit in work_units(sorted(self.fingerprints), self.config.num_chains)
                if not self.shards.is_done(unit, self.fingerprints[unit.step])]

    def complete(self, step: int) -> bool:
        return all(self.shards.folder(unit).is_dir()
                   for unit in work_units([step], self.config.num_chains))

    def compute(self, units: list[WorkUnit], keep_going: bool) -> list[str]:
        """Estimate ``units`` (this rank's), one checkpoint at a time, writing a shard per
        chain (the main rank saves each checkpoint whose shards are then complete);
        returns the checkpoints that failed (with ``keep_going``)."""
        failures, processes = [], self.processes
        where = f" on rank {processes.rank} of {processes.world}" if processes.world > 1 else ""
        for step, chains in by_step(units).items():
            path = self.checkpoints[step]
            print(f"step {step}: estimating chains {_spans(chains)} of "
                  f"{self.config.num_chains}{where}", flush=True)
            start = time.perf_counter()
            try:
                model = load_model(path, self.tokenizer)
                done = estimate_chains(model, self.components, self.sampling.tensors,
                                       self.probe, self.config, chains)
            except (CommandError, ChainDivergedError) as error:
                if not keep_going:
                    raise CommandError(str(error)) from error
                failures.append(f"{path.name}: {error}")
                print(f"step {step}: skipped, {error}", file=sys.stderr)
                continue
            except ValueError as error:
                raise CommandError(f"{path}: {error}") from error
            for shard in done:
                self.shards.write(step, shard, self.fingerprints[step])
            print(f"step {step}: chains {_spans(chains)} done{where} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            if processes.main:
                self.save_merged(step)  # one process saves each checkpoint as it goes
        return failures

    def save_merged(self, step: int) -> None:
        """Main rank: merge the shards of ``step`` into its result, save it and remove
        them (nothing when some are missing: that checkpoint failed, and says so)."""
        if not self.complete(step):
            return
        units = work_units([step], self.config.num_chains)
        result = merged_result([self.shards.read(unit) for unit in units], self.probe,
                               self.config, step)
        result.extra.update(checkpoint=str(self.checkpoints[step]),
                            components=self.components,
                            probe_tokens=self.probe_texts)
        print(f"step {step}: saved {self.store.save(result)}", flush=True)
        self.shards.clear(step)


def _steps_to_compute(analysis: _Analysis, args: argparse.Namespace) -> set[int]:
    """The checkpoints to estimate. Every saved result that stays in the series is checked
    against this analysis first, so that nothing is computed for a series that would then
    be refused; a damaged one is computed again when its checkpoint is at hand. With
    ``--force`` every checkpoint is, from scratch (its shards discarded)."""
    store, checkpoints = analysis.store, analysis.checkpoints
    todo = set(checkpoints) if args.force else set()
    for step in todo:
        analysis.shards.clear(step)
    for step, path in store.saved_steps().items():
        if step in todo:
            continue
        try:
            _check_saved(store.load(step), path, analysis.config, analysis.components,
                         analysis.probe)
        except ResultFileError as error:
            if step not in checkpoints:
                if args.keep_going:
                    continue  # left out of the TensorBoard run, named there
                raise CommandError(f"{error} (no checkpoint-{step} to compute it again "
                                   "from; --keep-going leaves it out)") from error
            print(f"step {step}: saved result is damaged ({error.problem}); recomputing",
                  file=sys.stderr)
            todo.add(step)
    return todo | {step for step in checkpoints if not store.has(step)}


def _check_saved(saved: SusceptibilityResult, path: Path, config: SGLDConfig, components: str,
                 probe: ProbeSet) -> None:
    check_same_settings(saved, config, saved.component_names, path, SERIES_REMEDY)
    if saved.extra.get("components") not in (None, components):
        raise CommandError(f"{path} holds components {saved.extra['components']!r}, not "
                           f"{components!r}; {SERIES_REMEDY}")
    check_same_probe(saved, probe.input_ids.numpy(), path, SERIES_REMEDY)


def _digest(data: ProbeSet) -> str:
    digest = hashlib.sha256()
    for key in sorted(data.tensors):
        digest.update(key.encode())
        digest.update(data.tensors[key].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _spans(chains: list[int]) -> str:
    """``0-3,6`` for chains 0, 1, 2, 3 and 6."""
    spans: list[list[int]] = []
    for chain in chains:
        if spans and spans[-1][1] == chain - 1:
            spans[-1][1] = chain
        else:
            spans.append([chain, chain])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in spans)
