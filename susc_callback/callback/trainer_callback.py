"""``SusceptibilityCallback``: susceptibilities on a schedule during Hugging Face training.

At each scheduled step the callback runs the engine on a float32 snapshot of the model
(never the live model, never the global RNGs), saves the result under
``output_dir/susceptibility/step-{N}`` (and inside ``checkpoint-{N}/susceptibility`` when
that step is a checkpoint), and logs scalars, figures, the projector and a token table into
the Trainer's TensorBoard run directory. Steps without a snapshot cost one set lookup.

Under DDP every rank estimates a share of the components (chains are seeded by component
name, so the split does not change any number) and rank 0 merges, saves and logs.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from susc_callback.analysis.pca import STANDARDIZATIONS, Standardization
from susc_callback.analysis.series import SnapshotSeries, check_same_settings, saved_steps, step_dir
from susc_callback.callback import distributed
from susc_callback.callback.schedule import Schedule
from susc_callback.components.component import as_components
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet, probe_token_texts
from susc_callback.data.sampling import LossFn, SamplingData
from susc_callback.estimator.engine import check_inputs, estimate_susceptibilities
from susc_callback.estimator.results import SusceptibilityResult, merge_results
from susc_callback.logging.tensorboard import TensorBoardLogger, drop_events_after, snapshot_scalars
from susc_callback.sampler.isolation import preserved_rng_state

logger = logging.get_logger(__name__)

class SusceptibilityCallback(TrainerCallback):
    """Estimates per-token susceptibilities of model components during training.

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
        log_dir: TensorBoard run directory; default the one the Trainer's TensorBoard
            integration writes to (``output_dir/runs/...`` when TensorBoard reporting is off).
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
        if isinstance(n_pcs, bool) or not isinstance(n_pcs, int) or n_pcs < 1:
            raise ValueError(f"n_pcs must be a positive integer, got {n_pcs!r}")
        if standardization not in STANDARDIZATIONS:
            raise ValueError(f"Invalid standardization {standardization!r}; valid: "
                             f"{', '.join(STANDARDIZATIONS)}")
        if isinstance(top_tokens, bool) or not isinstance(top_tokens, int) or top_tokens < 1:
            raise ValueError(f"top_tokens must be a positive integer, got {top_tokens!r}")
        self.probe, self.components = probe, components
        self.config = config or SGLDConfig()
        self.schedule = Schedule.coerce(schedule)
        self.sampling_data, self.collate_fn, self.loss_fn = sampling_data, collate_fn, loss_fn
        self.n_pcs, self.standardization = n_pcs, standardization
        self.output_dir, self.log_dir = output_dir, log_dir
        self.top_tokens, self.strict = top_tokens, strict

    @property
    def results_dir(self) -> Path:
        """Where snapshots are saved (``.../susceptibility``); known once training begins."""
        return self._results_dir

    @property
    def tensorboard_dir(self) -> Path:
        """The TensorBoard run directory written to (main process, once training begins)."""
        return self._logger.log_dir

    # -- events -----------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        """Validate everything that can be validated now, restore the history of a resumed
        run, and take the step-0 snapshot if scheduled."""
        if model is None:
            raise ValueError("SusceptibilityCallback needs the model: the Trainer passed none")
        self._trainer = _calling_trainer()
        if _shards_parameters(self._trainer):
            raise ValueError("SusceptibilityCallback does not support FSDP or DeepSpeed ZeRO-3: "
                             "each process holds only a shard of the weights, so there is no "
                             "model to snapshot; train with DDP, or analyse the saved "
                             "checkpoints afterwards with `susc analyze`")
        self._rank, self._world = distributed.rank_and_world()
        self._main = state.is_world_process_zero
        self._run_config = self.config.replace(
            on_divergence="raise" if self.strict else "mark")
        self._components = as_components(model, self.components)
        # Collating a sampling batch may draw random numbers (e.g. an MLM collator).
        with preserved_rng_state(next(model.parameters()).device):
            _, self._data = check_inputs(model, self._components, self._sampling_data(
                train_dataloader), self.probe, self._run_config, collate_fn=self.collate_fn)
        self.schedule.check(state.max_steps)
        self._planned = self.schedule.planned_steps(state.max_steps)
        self._results_dir = Path(self.output_dir or args.output_dir) / "susceptibility"
        self._probe_tokens = probe_token_texts(self.probe, _tokenizer(kwargs))
        done, error = None, None
        if self._main:
            try:
                done = self._restore_history(args, state)
            except Exception as exc:  # raised below on every rank, not only on this one
                error = exc
        done, error = distributed.broadcast_from_main((done, error))
        if error is not None:
            raise error
        self._done: set[int] = set(done)
        self._train_start, self._snapshot_seconds = time.perf_counter(), 0.0
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
        distributed.barrier()  # the checkpoint is complete on every rank
        if step not in self._done:
            self._take_snapshot(args, state, control, model, step)
        if self._main:
            self._copy_into_checkpoint(args, step)

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
                    self._copy_into_checkpoint(args, step)
        if self._main:
            self._logger.close()

    # -- snapshot ---------------------------------------------------------------------------

    def _take_snapshot(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module, step: int) -> None:
        """Estimate this rank's share, gather on every rank, publish on the main rank."""
        start = time.perf_counter()
        mine = distributed.share(self._components, self._rank, self._world)
        part, error = None, None
        try:
            if mine:
                part = estimate_susceptibilities(model, mine, self._data, self.probe,
                                                 self._run_config, loss_fn=self.loss_fn,
                                                 step=step)
        except Exception:  # reported below, on every rank, after the collective
            error = traceback.format_exc()
        gathered = distributed.all_gather((part, error))
        errors = {rank: e for rank, (_, e) in enumerate(gathered) if e is not None}
        self._done.add(step)
        if not errors and self._main:
            try:
                result = merge_results([p for p, _ in gathered if p is not None],
                                       [c.name for c in self._components])
                self._publish(args, state, control, result, time.perf_counter() - start)
            except Exception:
                errors[self._rank] = traceback.format_exc()
        errors = distributed.broadcast_from_main(errors)  # every rank reports the same
        if errors:
            self._report_failure(step, errors)

    def _publish(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                 result: SusceptibilityResult, seconds: float) -> None:
        """Save, analyse and log one merged result (main rank)."""
        if self._probe_tokens is not None:
            result.extra["probe_tokens"] = self._probe_tokens
        result.save(step_dir(self._results_dir, result.step))
        pca = self._series.add(result)
        self._snapshot_seconds += seconds
        elapsed = time.perf_counter() - self._train_start
        scalars = snapshot_scalars(result, pca)
        scalars["snapshot/seconds"] = seconds
        scalars["snapshot/time_share"] = self._snapshot_seconds / max(elapsed, 1e-9)
        self._logger.log_snapshot(result, pca, self._series, scalars)
        self._report_to_other_loggers(args, state, control, scalars)
        for name, reason in result.failed.items():
            logger.warning(f"Susceptibility snapshot at step {result.step}: component {name} "
                           f"failed: {reason}")
        logger.info(f"Susceptibility snapshot at step {result.step}: {seconds:.1f} s, "
                    f"saved to {step_dir(self._results_dir, result.step)}")

    def _report_failure(self, step: int, errors: dict[int, str]) -> None:
        detail = "\n".join(f"[rank {rank}] {text}" for rank, text in sorted(errors.items()))
        message = f"Susceptibility snapshot at step {step} failed:\n{detail}"
        if self.strict:
            raise RuntimeError(message)
        if self._main:
            warnings.warn(message + "\nTraining continues (strict=False).", RuntimeWarning,
                          stacklevel=2)

    def _report_to_other_loggers(self, args: TrainingArguments, state: TrainerState,
                                 control: TrainerControl, scalars: dict[str, float]) -> None:
        """Send the scalars to ``state.log_history`` and every reporting integration except
        TensorBoard (which has them already), without going through ``Trainer.log``: that
        would reset ``control.should_log`` and drop this step's loss log."""
        state.log_history.append({**scalars, "step": state.global_step})
        should_log = control.should_log
        for reporter in _other_reporters(self._trainer):
            reporter.on_log(args, state, control, logs=dict(scalars))
        control.should_log = should_log

    # -- setup and resume -------------------------------------------------------------------

    def _sampling_data(self, train_dataloader: Any) -> SamplingData:
        if self.sampling_data is not None:
            return SamplingData(self.sampling_data, self.collate_fn)
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None:
            raise ValueError("No sampling_data given and the Trainer has no train dataloader; "
                             "pass sampling_data= to SusceptibilityCallback")
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError("The train dataset is iterable (no random access), so SGLD cannot "
                             "draw its own minibatches from it; pass sampling_data= (e.g. a "
                             "token-id tensor of a few hundred sequences)")
        return SamplingData(dataset, self.collate_fn or train_dataloader.collate_fn)

    def _restore_history(self, args: TrainingArguments, state: TrainerState) -> list[int]:
        """Main rank: keep saved snapshots up to the resumed step, set aside later ones (they
        belong to a discarded continuation), rebuild the PC history, open the logger."""
        resumed = state.global_step
        saved = saved_steps(self._results_dir)
        kept = {s: p for s, p in saved.items() if resumed > 0 and s <= resumed}
        self._series = SnapshotSeries(self.n_pcs, self.standardization)
        for path in kept.values():  # checked before anything on disk changes
            result = SusceptibilityResult.load(path)
            check_same_settings(result, self._run_config,
                                [c.name for c in self._components], path)
            self._series.add(result)
        orphans = [p for s, p in saved.items() if s not in kept]
        if orphans:
            self._set_aside(orphans)
        log_dir = self._tensorboard_dir(args)
        dropped = drop_events_after(log_dir, resumed if resumed > 0 else None)
        if dropped:
            logger.info(f"Removed {dropped} susceptibility TensorBoard events after step "
                        f"{resumed} from {log_dir}")
        self._logger = TensorBoardLogger(log_dir, self.top_tokens)
        return list(kept)

    def _set_aside(self, orphans: list[Path]) -> None:
        target = self._results_dir / "orphaned" / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True, exist_ok=True)
        for path in orphans:
            shutil.move(str(path), str(target / path.name))
        warnings.warn(f"Moved {len(orphans)} saved susceptibility snapshots that are not part "
                      f"of this run's history (after the resumed step, or from an earlier run) "
                      f"to {target}", UserWarning, stacklevel=3)

    def _tensorboard_dir(self, args: TrainingArguments) -> Path:
        if self.log_dir is not None:
            return Path(self.log_dir)
        tensorboard = _tensorboard_integration(self._trainer)
        if tensorboard is not None and getattr(tensorboard, "tb_writer", None) is not None:
            return Path(tensorboard.tb_writer.log_dir)
        configured = getattr(tensorboard, "logging_dir", None) or os.getenv(
            "TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
        if configured:
            return Path(os.path.expanduser(configured))
        from transformers.integrations.integration_utils import default_logdir
        return Path(args.output_dir) / default_logdir()

    def _copy_into_checkpoint(self, args: TrainingArguments, step: int) -> None:
        source = step_dir(self._results_dir, step)
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if source.is_dir() and checkpoint.is_dir():
            shutil.copytree(source, checkpoint / "susceptibility", dirs_exist_ok=True)


def _calling_trainer() -> Trainer | None:
    """The Trainer whose event is being handled. Callback events do not receive it, yet its
    TensorBoard run directory and reporting integrations live on it: it is the nearest
    ``self`` up the call stack that is a Trainer (None for a hand-written loop)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _shards_parameters(trainer: Trainer | None) -> bool:
    """Whether the Trainer shards parameters across processes (FSDP, DeepSpeed ZeRO-3)."""
    if trainer is None:
        return False
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
    return bool(getattr(trainer, "is_deepspeed_enabled", False)) and \
        getattr(plugin, "zero_stage", None) == 3


def _tensorboard_integration(trainer: Trainer | None) -> TrainerCallback | None:
    from transformers.integrations import TensorBoardCallback

    callbacks = trainer.callback_handler.callbacks if trainer is not None else []
    return next((c for c in callbacks if isinstance(c, TensorBoardCallback)), None)


def _other_reporters(trainer: Trainer | None) -> list[TrainerCallback]:
    from transformers.integrations import INTEGRATION_TO_CALLBACK, TensorBoardCallback

    kinds = tuple(c for c in INTEGRATION_TO_CALLBACK.values() if c is not TensorBoardCallback)
    callbacks = trainer.callback_handler.callbacks if trainer is not None else []
    return [c for c in callbacks if isinstance(c, kinds)]


def _tokenizer(event_kwargs: dict) -> Any:
    for key in ("processing_class", "tokenizer"):
        candidate = event_kwargs.get(key)
        candidate = getattr(candidate, "tokenizer", candidate)  # a processor wraps one
        if candidate is not None and hasattr(candidate, "decode"):
            return candidate
    return None
