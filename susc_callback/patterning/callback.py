"""``PatterningCallback``: online patterning during Hugging Face training.

On a schedule it estimates the susceptibilities of the components on the training pool at
the current weights (a private snapshot, as :class:`SusceptibilityCallback` does), plans
the data weights that move the components' coordinates by the target
(:func:`~susc_callback.patterning.inverse.plan_patterning`) and puts them into the pool
(:class:`~susc_callback.patterning.training.WeightedPool`). It changes training on purpose,
and only through those weights. It logs to TensorBoard beside the loss: the target, the
predicted change and the realised change (the coordinate at this estimate minus at the
previous one, training's own drift included) of every targeted component, and the
weights' distribution. ``history_`` keeps the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from transformers import TrainerControl, TrainerState, TrainingArguments

from susc_callback.callback import trainer_context
from susc_callback.callback.bound import BoundCallback
from susc_callback.callback.schedule import Schedule
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.estimator.engine import estimate_susceptibilities
from susc_callback.patterning.inverse import PatterningPlan, plan_patterning
from susc_callback.patterning.mixture import MixtureSampler
from susc_callback.patterning.training import WeightedPool, token_weight_table, weight_summary


@dataclass
class PatterningStep:
    """One re-estimation: the coordinates, the plan, the realised change since the
    previous re-estimation (None at the first) and, with dataset weights, the weight
    applied to each dataset (the plan's, smoothed with the previous ones)."""

    step: int
    coordinates: dict[str, float]
    plan: PatterningPlan
    realised: dict[str, float] | None
    applied: dict[str, float] | None = None


class PatterningCallback(BoundCallback):
    """Re-plan the pool's loss weights on a schedule (see the module docstring).

    Args:
        pool: the :class:`WeightedPool` the Trainer trains on.
        target: the change of coordinates to aim for at every re-estimation (any
            :data:`~susc_callback.patterning.inverse.Target`).
        components: the components whose coordinates are steered (and estimated).
        schedule: when to re-estimate (a :class:`Schedule`, an int or a list of steps);
            default every 100 steps, from step 0.
        config: SGLD settings of each estimate.
        sampling_data: what SGLD samples with (default: the pool itself).
        probe: the sequences whose susceptibilities are estimated (default: the pool
            itself, with weights per token or sequence). A separate, smaller probe set
            labelled by dataset steers a large pool by dataset: with
            ``plan_options={"granularity": "dataset"}`` every pool sequence gets its
            dataset's weight, from ``pool_datasets``.
        pool_datasets: the dataset label of every pool sequence (with ``probe``).
        mixture_sampler: apply the dataset weights by sampling instead: the
            :class:`~susc_callback.patterning.mixture.MixtureSampler` the
            ``PatternedTrainer`` draws its batches with (with ``probe``; the pool's loss
            weights then stay 1).
        plan_options: keyword arguments of ``plan_patterning`` (granularity, ridge, rank,
            alpha, max_change, min_weight, susceptibility).
        smoothing: in [0, 1): the weights applied after a re-plan are ``smoothing`` times
            the previous ones plus ``1 - smoothing`` times the new plan's (the first plan
            is applied as it is). A plan from few SGLD draws is noisy; smoothing averages
            it over re-plans (about ``1 / (1 - smoothing)`` of them) at the price of
            following a changing model more slowly. Default 0: each plan as it is.
        log_dir: TensorBoard run (default: the Trainer's, after :meth:`bind`).
    """

    def __init__(self, pool: WeightedPool, target: Any, *, components: Any = "heads",
                 schedule: Schedule | int | list[int] | None = None,
                 config: SGLDConfig | None = None, sampling_data: Any = None,
                 plan_options: dict[str, Any] | None = None, log_dir: str | None = None,
                 probe: ProbeSet | None = None, pool_datasets: list[str] | None = None,
                 mixture_sampler: MixtureSampler | None = None, smoothing: float = 0.0
                 ) -> None:
        if not isinstance(pool, WeightedPool):
            raise TypeError(f"pool must be a WeightedPool, got {type(pool).__name__}")
        if isinstance(smoothing, bool) or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be a number in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.pool, self.target, self.components = pool, target, components
        self.schedule = Schedule.coerce(schedule if schedule is not None else
                                        Schedule(every=100, at_start=True))
        self.config = config or SGLDConfig(progress=False)
        self.sampling_data = sampling_data
        self.plan_options = dict(plan_options or {})
        self.log_dir = log_dir
        if mixture_sampler is not None:
            if probe is None or pool_datasets is not None:
                raise ValueError("mixture_sampler needs a probe labelled by dataset (and no "
                                 "pool_datasets: the sampler knows the pool's labels)")
            pool_datasets = mixture_sampler.labels
        if (probe is None) != (pool_datasets is None):
            raise ValueError("probe and pool_datasets go together: a separate probe steers "
                             "the pool by dataset")
        if probe is not None:
            if self.plan_options.get("granularity") != "dataset":
                raise ValueError("A separate probe set steers the pool by dataset: pass "
                                 "plan_options={'granularity': 'dataset'}")
            if len(pool_datasets) != len(pool):
                raise ValueError(f"pool_datasets has {len(pool_datasets)} labels for a pool "
                                 f"of {len(pool)} sequences")
            missing = sorted(set(pool_datasets) - set(probe.dataset_names))
            if missing:
                raise ValueError(f"Pool datasets {missing} have no probe sequences; the "
                                 f"probe has {probe.dataset_names}")
        self.pool_datasets, self.mixture_sampler = pool_datasets, mixture_sampler
        self.probe = probe or ProbeSet.from_batch(
            {k: v for k, v in pool.tensors.items() if k in ("input_ids", "attention_mask")},
            "pool")
        self.history_: list[PatterningStep] = []
        self._writer: SummaryWriter | None = None
        self._planned: set[int] = set()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        if args.dataloader_num_workers != 0:
            raise ValueError(f"PatterningCallback needs dataloader_num_workers=0 (got "
                             f"{args.dataloader_num_workers}): data loader workers hold "
                             "copies of the pool, so new weights would never reach them")
        if self._trainer is not None and self._trainer.train_dataset is not self.pool:
            raise ValueError("The Trainer's train_dataset is not this callback's pool: the "
                             "weights would not reach the training loss")
        self.schedule.check(state.max_steps)
        self._planned = self.schedule.planned_steps(state.max_steps)
        if state.is_world_process_zero:
            self._writer = SummaryWriter(str(trainer_context.tensorboard_dir(
                self._trainer, args, self.log_dir)), filename_suffix=".patterning")
        if 0 in self._planned and state.global_step == 0:
            self._replan(model, 0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        if state.global_step in self._planned:
            self._replan(model, state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _replan(self, model: nn.Module, step: int) -> None:
        data = self.sampling_data if self.sampling_data is not None else self.probe.tensors
        result = estimate_susceptibilities(model, self.components, data, self.probe,
                                           self.config, step=step)
        plan = plan_patterning(result, self.target, **self.plan_options)
        keep = self.smoothing if self.history_ else 0.0
        applied = None
        if self.pool_datasets is None:
            self.pool.set_weights(keep * self.pool.weights
                                  + (1 - keep) * token_weight_table(plan, result))
        else:
            planned = dict(zip(plan.groups, plan.weights.tolist()))
            previous = self.history_[-1].applied if self.history_ else planned
            applied = {d: keep * previous[d] + (1 - keep) * planned[d] for d in planned}
            if self.mixture_sampler is not None:
                self.mixture_sampler.set_weights(
                    {d: applied[d] for d in self.mixture_sampler.names})
            else:
                self.pool.set_weights(self._dataset_rows(applied))
        coordinates = dict(zip(result.component_names, result.mean_phi.tolist()))
        previous = self.history_[-1].coordinates if self.history_ else None
        realised = None if previous is None else {
            name: coordinates[name] - previous[name] for name in coordinates}
        self.history_.append(PatterningStep(step, coordinates, plan, realised, applied))
        self._log(self.history_[-1])

    def _dataset_rows(self, weights: dict[str, float]) -> torch.Tensor:
        """Each pool sequence's dataset weight on all its tokens."""
        rows = torch.tensor([weights[d] for d in self.pool_datasets], dtype=torch.float32)
        return rows[:, None].expand_as(self.pool.weights).clone()

    def _log(self, record: PatterningStep) -> None:
        if self._writer is None:
            return
        step, plan, realised = record.step, record.plan, record.realised
        targeted = [i for i, value in enumerate(plan.target) if value != 0] or \
            range(len(plan.target))
        for i in targeted:
            name = plan.component_names[i]
            self._writer.add_scalar(f"patterning/target/{name}", plan.target[i], step)
            self._writer.add_scalar(f"patterning/predicted/{name}", plan.predicted[i], step)
            if realised is not None:
                self._writer.add_scalar(f"patterning/realised/{name}", realised[name], step)
        for key, value in weight_summary(plan.weights).items():
            self._writer.add_scalar(f"patterning/weights/{key}", value, step)
        self._writer.add_scalar("patterning/weights/clipped", plan.clipped, step)
        for name, weight in (record.applied or {}).items():  # few datasets: each readable
            self._writer.add_scalar(f"patterning/dataset_weight/{name}", weight, step)
        self._writer.add_histogram("patterning/weights", np.asarray(plan.weights), step)
        self._writer.flush()
