"""A Trainer callback that knows its Trainer: ``bind`` adds it and keeps the Trainer, whose
TensorBoard run and integrations the callback then writes into."""

from __future__ import annotations

from typing import TypeVar

from transformers import Trainer, TrainerCallback

Bound = TypeVar("Bound", bound="BoundCallback")


class BoundCallback(TrainerCallback):
    """Base of the package's callbacks; ``_trainer`` is None until :meth:`bind`."""

    _trainer: Trainer | None = None

    def bind(self: Bound, trainer: Trainer) -> Bound:
        """Work with ``trainer``: add this callback to its callbacks (if not there yet) and
        write into the TensorBoard run of its loss. Returns the callback."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"bind() needs a transformers Trainer, got {type(trainer).__name__}")
        self._trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self
