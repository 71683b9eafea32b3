"""``SusceptibilityCallback``: susceptibilities on a schedule during Hugging Face training.

At each scheduled step the callback runs the engine on a float32 snapshot of the model
(never the live model, never the global RNGs) and publishes the result through the run's
:class:`~susc_callback.logging.snapshots.SnapshotPublisher`: saved under
``output_dir/susceptibility/step-{N}`` (and inside ``checkpoint-{N}/susceptibility`` when
that step is a checkpoint), logged into the Trainer's TensorBoard run. Steps without a
snapshot cost one set lookup.

Under DDP every rank estimates a share of the components (chains are seeded by component
name, so the split does not change any number) and rank 0 merges and publishes.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from susc_callback.analysis.diagnostics import snapshot_problems
from susc_callback.analysis.pca import STANDARDIZATIONS, Standardization
from susc_callback.callback import trainer_context
from susc_callback.callback.bound import BoundCallback
from susc_callback.callback.schedule import Schedule
from susc_callback.components.component import Component
from susc_callback.components.resolve import as_components
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet, probe_token_texts
from susc_callback.data.sampling import LossFn, SamplingData
from susc_callback.estimator.engine import check_inputs, estimate_susceptibilities
from susc_callback.estimator.results import SusceptibilityResult, merge_results
from susc_callback.logging.other_loggers import send_media
from susc_callback.logging.snapshots import SnapshotPublisher
from susc_callback.logging.tensorboard import SnapshotMedia
from susc_callback.sampler.isolation import preserved_rng_state
from susc_callback.sharding import collectives
from susc_callback.store.run import RESULTS_FOLDER, RunStore

logger = logging.get_logger(__name__)
LOCK_WAIT_SECONDS = 60.0
"""How long a snapshot waits for another writer of the run's store (e.g. a `susc analyze`
on the same directory) before it fails, reported like any failed snapshot."""


class SusceptibilityCallback(BoundCallback):
    """Estimates per-token susceptibilities of model components during training.

    Bind it to the Trainer (``callback.bind(trainer)``, which also adds it to the Trainer's
    callbacks) so that it writes into the TensorBoard run of the loss and reports its
    scalars to the Trainer's other integrations; a callback that is only passed in
    ``Trainer(callbacks=[...])`` writes to ``output_dir/runs/susceptibility`` instead.

    Args:
        probe: the probe sequences whose per-token losses are observed (required).
        components: any component specification of :func:`estimate_susceptibilities`;
            default every attention head.
        config: SGLD hyperparameters; default :class:`SGLDConfig` (eps 1e-3, n_beta 30,
            gamma 300, 4 chains x 100 draws, batch 16), a starting point: see
            ``docs/callback.md`` for calibration.
        schedule: a :class:`Schedule`, an int (every N steps) or a list of steps; default
            16 log-spaced steps plus the last step.
        sampling_data: the data SGLD samples with; default the Trainer's train dataset and
            collator, read in the callback's own seeded order.
        collate_fn: collates examples of ``sampling_data``.
        loss_fn: per-sample loss ``loss_fn(model, batch)``; default next-token CE.
        n_pcs: principal components logged and followed across snapshots.
        standardization: "structural-inference", "spectroscopy" or "none".
        output_dir: where results go (``{output_dir}/susceptibility``); default the
            Trainer's ``output_dir``.
        log_dir: TensorBoard run directory; default the one the bound Trainer's TensorBoard
            integration writes to.
        top_tokens: tokens per component in the expressed/suppressed table.
        strict: raise on a failed snapshot or diverged chain instead of warning and going on.
    """

    def __init__(self, probe: ProbeSet, *, components: Any = None,
                 config: SGLDConfig | None = None,
                 schedule: Schedule | int | list[int] | None = None,
                 sampling_data: Any = None, collate_fn: Callable | None = None,
                 loss_fn: LossFn | None = None, n_pcs: int = 3,
                 standardization: Standardization = "structural-inference",
                 output_dir: str | os.PathLike | None = None,
                 log_dir: str | os.PathLike | None = None, top_tokens: int = 5,
                 strict: bool = False) -> None:
        if not isinstance(probe, ProbeSet):
            raise TypeError(f"probe must be a ProbeSet, got {type(probe).__name__}")
        if config is not None and not isinstance(config, SGLDConfig):
            raise TypeError(f"config must be an SGLDConfig, got {type(config).__name__}")
        for name, value in (("n_pcs", n_pcs), ("top_tokens", top_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if standardization not in STANDARDIZATIONS:
            raise ValueError(f"Invalid standardization {standardization!r}; valid: "
                             f"{', '.join(STANDARDIZATIONS)}")
        self.probe, self.components = probe, components
        self.config = config or SGLDConfig()
        self.schedule = Schedule.coerce(schedule)
        self.sampling_data, self.collate_fn, self.loss_fn = sampling_data, collate_fn, loss_fn
        self.n_pcs, self.standardization = n_pcs, standardization
        self.output_dir, self.log_dir = output_dir, log_dir
        self.top_tokens, self.strict = top_tokens, strict
        # Set when training begins (on_train_begin):
        self._rank, self._world, self._main = 0, 1, True
        self._run_config = self.config
        self._components: list[Component] = []
        self._data: SamplingData | None = None
        self._planned: set[int] = set()
        self._done: set[int] = set()
        self._store: RunStore | None = None
        self._publisher: SnapshotPublisher | None = None
        self._probe_tokens: list[list[str]] | None = None
        self._train_start, self._snapshot_seconds = 0.0, 0.0

    @property
    def results_dir(self) -> Path | None:
        """Where snapshots are saved (``.../susceptibility``): known from ``output_dir``, or
        once training begins (None before that)."""
        if self._store is not None:
            return self._store.root
        return None if self.output_dir is None else Path(self.output_dir) / RESULTS_FOLDER

    @property
    def tensorboard_dir(self) -> Path | None:
        """The TensorBoard run written to (main process): ``log_dir``, or known once
        training begins (None before that)."""
        if self._publisher is not None:
            return self._publisher.log_dir
        return None if self.log_dir is None else Path(self.log_dir)

    # -- events -----------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        """Validate everything that can be validated now, restore the history of a resumed
        run, and take the step-0 snapshot if scheduled."""
        self._prepare(args, state, model, train_dataloader, kwargs)
        if 0 in self._planned and state.global_step == 0:
            self._take_snapshot(args, state, control, model, 0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        step = state.global_step
        if step in self._planned and step not in self._done:
            self._take_snapshot(args, state, control, model, step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        step = state.global_step
        if step not in self._done and not self.schedule.on_save:
            return
        collectives.barrier()  # the checkpoint is complete on every rank
        if step not in self._done:
            self._take_snapshot(args, state, control, model, step)
        if self._main:
            self._store.copy_into_checkpoint(step, args.output_dir)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        step = state.global_step
        best = getattr(state, "best_global_step", None)
        if self.schedule.at_end and step not in self._done:
            if args.load_best_model_at_end and best not in (None, step):
                if self._main:
                    warnings.warn(f"No at-end susceptibility snapshot: the Trainer loaded the "
                                  f"best model (step {best}) before training ended, so the "
                                  f"weights of step {step} are gone", UserWarning, stacklevel=2)
            else:
                self._take_snapshot(args, state, control, model, step)
                if self._main:
                    self._store.copy_into_checkpoint(step, args.output_dir)
        if self._main:
            self._publisher.close()

    # -- setup and resume -------------------------------------------------------------------

    def _prepare(self, args: TrainingArguments, state: TrainerState, model: nn.Module | None,
                 train_dataloader: Any, event_kwargs: dict) -> None:
        if model is None:
            raise ValueError("SusceptibilityCallback needs the model: the Trainer passed none")
        if trainer_context.shards_parameters(self._trainer, args):
            raise ValueError("SusceptibilityCallback does not support FSDP or DeepSpeed ZeRO-3: "
                             "each process holds only a shard of the weights, so there is no "
                             "model to snapshot; train with DDP, or analyse the saved "
                             "checkpoints afterwards with `susc analyze`")
        self._rank, self._world = collectives.rank_and_world()
        self._main = state.is_world_process_zero
        self._run_config = self.config.replace(on_divergence="raise" if self.strict else "mark")
        self._components = as_components(model, self.components)
        data = SamplingData(self.sampling_data, self.collate_fn) \
            if self.sampling_data is not None else \
            trainer_context.training_sampling_data(train_dataloader, self.collate_fn)
        # Collating a sampling batch may draw random numbers (e.g. an MLM collator).
        with preserved_rng_state(next(model.parameters()).device):
            _, self._data = check_inputs(model, self._components, data, self.probe,
                                         self._run_config, loss_fn=self.loss_fn,
                                         collate_fn=self.collate_fn)
        saves = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        self.schedule.check(state.max_steps, saves)
        self._planned = self.schedule.planned_steps(state.max_steps)
        self._store = RunStore(Path(self.output_dir or args.output_dir) / RESULTS_FOLDER)
        self._probe_tokens = probe_token_texts(self.probe,
                                               trainer_context.event_tokenizer(event_kwargs))
        self._done = set(collectives.on_main(lambda: self._restore_history(args, state)))
        self._train_start, self._snapshot_seconds = time.perf_counter(), 0.0

    def _restore_history(self, args: TrainingArguments, state: TrainerState) -> list[int]:
        """Main rank: open the publisher and restore the run's history up to the resumed
        step (see :meth:`SnapshotPublisher.restore`)."""
        if self._trainer is None:
            logger.info("SusceptibilityCallback is not bound to a Trainer "
                        "(callback.bind(trainer)): it writes its own TensorBoard run and "
                        "reports its scalars to TensorBoard and state.log_history only")
        log_dir = trainer_context.tensorboard_dir(self._trainer, args, self.log_dir)
        self._publisher = SnapshotPublisher(self._store, log_dir, self.n_pcs,
                                            self.standardization, self.top_tokens)
        with self._store.writing(LOCK_WAIT_SECONDS):
            restored = self._publisher.restore(state.global_step, self._run_config,
                                               [c.name for c in self._components])
        if restored.set_aside:
            warnings.warn(f"Moved {len(restored.set_aside)} saved susceptibility snapshots "
                          f"that are not part of this run's history (after the resumed step, "
                          f"or from an earlier run) to {restored.set_aside_to}", UserWarning,
                          stacklevel=4)
        logger.info(f"Susceptibility TensorBoard run {log_dir} rebuilt from the "
                    f"{len(restored.kept)} saved snapshots up to step {state.global_step}")
        for step in restored.kept:  # repair copies that a kill interrupted
            self._store.copy_into_checkpoint(step, args.output_dir, only_if_missing=True)
        return restored.kept

    # -- snapshot ---------------------------------------------------------------------------

    def _take_snapshot(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module, step: int) -> None:
        """Estimate this rank's share, gather on every rank, publish on the main rank."""
        start = time.perf_counter()
        config = self._run_config
        self._announce(args, f"Susceptibility snapshot at step {step}: {len(self._components)} "
                             f"components and the full chain, {config.num_chains} chains x "
                             f"{config.num_draws} draws ...")
        mine = collectives.share(self._components, self._rank, self._world)
        part, error = None, None
        try:
            if mine:
                part = estimate_susceptibilities(model, mine, self._data, self.probe,
                                                 self._run_config, loss_fn=self.loss_fn,
                                                 step=step)
        except Exception:  # reported below, on every rank, after the collective
            error = traceback.format_exc()
        gathered = collectives.all_gather((part, error))
        errors = {rank: e for rank, (_, e) in enumerate(gathered) if e is not None}
        self._done.add(step)
        if not errors and self._main:
            try:
                result = merge_results([p for p, _ in gathered if p is not None],
                                       [c.name for c in self._components])
                self._publish(args, state, control, result, time.perf_counter() - start)
            except Exception:
                errors[self._rank] = traceback.format_exc()
        errors = collectives.broadcast_from_main(errors)  # every rank reports the same
        if errors:
            self._report_failure(step, errors)

    def _publish(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                 result: SusceptibilityResult, seconds: float) -> None:
        """Publish one merged result (main rank) and report it to the other loggers."""
        if self._probe_tokens is not None:
            result.extra["probe_tokens"] = self._probe_tokens
        self._snapshot_seconds += seconds
        elapsed = time.perf_counter() - self._train_start
        with self._store.writing(LOCK_WAIT_SECONDS):
            scalars, media = self._publisher.publish(result, {
                "snapshot/seconds": seconds,
                "snapshot/time_share": self._snapshot_seconds / max(elapsed, 1e-9)})
        self._report_to_other_loggers(args, state, control, scalars, media)
        for name, reason in result.failed.items():
            logger.warning(f"Susceptibility snapshot at step {result.step}: component {name} "
                           f"failed: {reason}")
        for problem in snapshot_problems(result):
            logger.warning(f"Susceptibility snapshot at step {result.step}, {problem}")
        self._announce(args, f"Susceptibility snapshot at step {result.step}: done in "
                             f"{seconds:.0f} s, saved to {self._store.step_dir(result.step)}")

    def _announce(self, args: TrainingArguments, text: str) -> None:
        """A line in the Trainer's console output (main process): beside its progress bar,
        or printed like its log dicts when the bar is off."""
        if not self._main:
            return
        if args.disable_tqdm:
            print(text, flush=True)
        else:
            tqdm.write(text)

    def _report_failure(self, step: int, errors: dict[int, str]) -> None:
        detail = "\n".join(f"[rank {rank}] {text}" for rank, text in sorted(errors.items()))
        message = f"Susceptibility snapshot at step {step} failed:\n{detail}"
        if self.strict:
            raise RuntimeError(message)
        if self._main:
            warnings.warn(message + "\nTraining continues (strict=False).", RuntimeWarning,
                          stacklevel=2)

    def _report_to_other_loggers(self, args: TrainingArguments, state: TrainerState,
                                 control: TrainerControl, scalars: dict[str, float],
                                 media: SnapshotMedia) -> None:
        """Send the scalars to ``state.log_history`` and every reporting integration except
        TensorBoard (which has them already), without going through ``Trainer.log``: that
        would reset ``control.should_log`` and drop this step's loss log. Integrations that
        show figures (W&B, MLflow) get the figures and the token table too."""
        state.log_history.append({**scalars, "step": state.global_step})
        should_log = control.should_log
        reporters = trainer_context.other_reporters(self._trainer)
        for reporter in reporters:
            reporter.on_log(args, state, control, logs=dict(scalars))
        send_media(reporters, state.global_step, media)
        control.should_log = should_log
