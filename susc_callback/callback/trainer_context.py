"""What the callback needs to know about the Trainer it is bound to, in one place.

Callback events receive the training arguments, state and model, not the Trainer; the
TensorBoard run of the loss curves and the other reporting integrations live on the
Trainer, which :meth:`SusceptibilityCallback.bind` hands over explicitly. Without it (a
callback passed only through ``Trainer(callbacks=[...])``, or a hand-written loop) these
functions fall back on the training arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from susc_callback.data.sampling import SamplingData
from susc_callback.store.run import default_log_dir


def shards_parameters(trainer: Trainer | None, args: TrainingArguments) -> bool:
    """Whether training shards parameters across processes (FSDP, DeepSpeed ZeRO-3)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if trainer is None:
        return bool(getattr(args, "fsdp", None)) or is_deepspeed_zero3_enabled()
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
    return bool(getattr(trainer, "is_deepspeed_enabled", False)) and \
        getattr(plugin, "zero_stage", None) == 3


def tensorboard_dir(trainer: Trainer | None, args: TrainingArguments,
                    log_dir: str | os.PathLike | None) -> Path:
    """The TensorBoard run to write to: ``log_dir`` if given, else the one the Trainer's
    TensorBoard integration writes the loss to, else the configured logging directory,
    else ``output_dir/runs/susceptibility``."""
    if log_dir is not None:
        return Path(log_dir)
    tensorboard = _tensorboard_integration(trainer)
    if tensorboard is not None and getattr(tensorboard, "tb_writer", None) is not None:
        return Path(tensorboard.tb_writer.log_dir)
    configured = getattr(tensorboard, "logging_dir", None) or os.getenv(
        "TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
    if configured:
        return Path(os.path.expanduser(configured))
    if trainer is None:
        return default_log_dir(args.output_dir)
    from transformers.integrations.integration_utils import default_logdir
    return Path(args.output_dir) / default_logdir()


def other_reporters(trainer: Trainer | None) -> list[TrainerCallback]:
    """The Trainer's reporting integrations other than TensorBoard (W&B, MLflow, ...)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, TensorBoardCallback

    kinds = tuple(c for c in INTEGRATION_TO_CALLBACK.values() if c is not TensorBoardCallback)
    callbacks = trainer.callback_handler.callbacks if trainer is not None else []
    return [c for c in callbacks if isinstance(c, kinds)]


def event_tokenizer(event_kwargs: dict) -> Any:
    """The tokenizer among an event's keyword arguments (None if there is none)."""
    for key in ("processing_class", "tokenizer"):
        candidate = event_kwargs.get(key)
        candidate = getattr(candidate, "tokenizer", candidate)  # a processor wraps one
        if candidate is not None and hasattr(candidate, "decode"):
            return candidate
    return None


def training_sampling_data(train_dataloader: Any, collate_fn: Any = None) -> SamplingData:
    """The Trainer's train dataset with ``collate_fn`` (default the Trainer's collator),
    read in the callback's own order."""
    dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None:
        raise ValueError("No sampling_data given and the Trainer has no train dataloader; "
                         "pass sampling_data= to SusceptibilityCallback")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError("The train dataset is iterable (no random access), so SGLD cannot "
                         "draw its own minibatches from it; pass sampling_data= (e.g. a "
                         "token-id tensor of a few hundred sequences)")
    return SamplingData(dataset, collate_fn or train_dataloader.collate_fn)


def _tensorboard_integration(trainer: Trainer | None) -> TrainerCallback | None:
    from transformers.integrations import TensorBoardCallback

    callbacks = trainer.callback_handler.callbacks if trainer is not None else []
    return next((c for c in callbacks if isinstance(c, TensorBoardCallback)), None)
