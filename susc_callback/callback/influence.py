"""``InfluenceCallback``: the influence matrix on a schedule during Hugging Face training.

At each scheduled step (main process) it runs :func:`~susc_callback.influence.
estimate_influence` on a private snapshot (the model, the optimizer and every RNG stream
are left exactly as they were), saves the result under ``output_dir/influence/step-{N}``
(the layout ``susc influence`` writes and ``susc report`` reads) and logs to TensorBoard
beside the loss:

* ``influence/mean_abs`` and ``influence/self_influence_mean`` (full posterior);
* ``influence/top_overlap/q{j}``: for query sequence ``j``, the Jaccard overlap of its
  ``count`` most influential training sequences with those of the previous snapshot
  (1: the same data matter; 0: other data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from transformers import TrainerControl, TrainerState, TrainingArguments

from susc_callback.callback import trainer_context
from susc_callback.callback.bound import BoundCallback
from susc_callback.callback.schedule import Schedule
from susc_callback.config import SGLDConfig
from susc_callback.influence import InfluenceResult, estimate_influence
from susc_callback.influence.views import influential_sequences
from susc_callback.store.run import INFLUENCE_FOLDER, RunStore


class InfluenceCallback(BoundCallback):
    """Estimates the influence of ``train`` on ``queries`` during training.

    Args:
        train, queries: the training and query sequences (any form ``estimate_influence``
            takes).
        config: SGLD settings (default :class:`SGLDConfig`).
        schedule: a :class:`Schedule`, an int (every N steps) or a list of steps; default
            16 log-spaced steps plus the last step.
        count: training sequences per query in the overlap scalars.
        output_dir: where results go (``{output_dir}/influence``); default the Trainer's.
        log_dir: TensorBoard run; default the bound Trainer's (:meth:`bind`).
        options: keyword arguments of ``estimate_influence`` (components, train_level,
            query_level, sampling_data, train_index, max_bytes, loss_fn).
    """

    def __init__(self, train: Any, queries: Any, *, config: SGLDConfig | None = None,
                 schedule: Schedule | int | list[int] | None = None, count: int = 5,
                 output_dir: str | os.PathLike | None = None,
                 log_dir: str | os.PathLike | None = None, **options: Any) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        self.train, self.queries, self.count = train, queries, count
        self.config = config or SGLDConfig(progress=False)
        self.schedule = Schedule.coerce(schedule)
        self.output_dir, self.log_dir, self.options = output_dir, log_dir, options
        self.results_: list[InfluenceResult] = []
        self._store: RunStore | None = None
        self._writer: SummaryWriter | None = None
        self._planned: set[int] = set()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        self.schedule.check(state.max_steps,
                            str(getattr(args.save_strategy, "value", args.save_strategy)) != "no")
        self._planned = self.schedule.planned_steps(state.max_steps)
        if not state.is_world_process_zero:
            return
        self._store = RunStore.of_run(self.output_dir or args.output_dir, INFLUENCE_FOLDER,
                                      InfluenceResult)
        self._writer = SummaryWriter(str(trainer_context.tensorboard_dir(
            self._trainer, args, self.log_dir)), filename_suffix=".influence")
        if 0 in self._planned and state.global_step == 0:
            self._snapshot(model, 0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        if self._writer is not None and state.global_step in self._planned:
            self._snapshot(model, state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        if self._writer is None:
            return
        last = self.results_[-1].step if self.results_ else None
        if self.schedule.at_end and last != state.global_step:
            self._snapshot(model, state.global_step)
        self._writer.close()
        self._writer = None

    def _snapshot(self, model: nn.Module, step: int) -> None:
        result = estimate_influence(model, self.train, self.queries, self.config, step=step,
                                    **self.options)
        with self._store.writing(60.0):
            self._store.save(result)
        previous = self.results_[-1] if self.results_ else None
        self.results_.append(result)
        full = result.posterior_names.index("full")
        self._writer.add_scalar("influence/mean_abs",
                                float(np.abs(result.influence[full]).mean()), step)
        self._writer.add_scalar("influence/self_influence_mean",
                                float(result.self_influence[full].mean()), step)
        if previous is not None:
            for query in range(len(result.query_datasets)):
                now, before = (influential_sequences(r, query, self.count).sequences
                               for r in (result, previous))
                self._writer.add_scalar(f"influence/top_overlap/q{query}",
                                        len(now & before) / max(len(now | before), 1), step)
        self._writer.flush()

    @property
    def results_dir(self) -> Path | None:
        """Where results are saved, once training begins."""
        return None if self._store is None else self._store.root
