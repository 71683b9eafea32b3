"""An independent check of what each attention head does, from its attention pattern.

On random token sequences repeated twice (``x x``, no structure but the repeat):

* **prefix matching**: the attention a head pays, from a token of the second copy, to the
  token right after that token's first occurrence — the signature of an induction head;
* **previous token**: the attention paid to the immediately preceding token — the heads
  that feed induction heads in the classic two-layer circuit.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import TrainerCallback

from susc_callback import Schedule


@torch.no_grad()
def attention_scores(model: torch.nn.Module, vocab: int, period: int = 24, count: int = 32,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """``{"prefix_matching": (layers, heads), "previous_token": (layers, heads),
    "second_copy_loss": ()}``: the last is the mean next-token loss inside the second copy
    (near ``log(vocab)`` without induction, near 0 with it)."""
    generator = torch.Generator().manual_seed(seed)
    unit = torch.randint(0, vocab, (count, period), generator=generator)
    ids = torch.cat([unit, unit], dim=1)
    copy = deepcopy(model).float().eval()
    copy.set_attn_implementation("eager")  # attention weights are returned by eager only
    device = next(copy.parameters()).device
    output = copy(input_ids=ids.to(device), output_attentions=True)
    attentions = output.attentions
    logits = output.logits[:, period:-1].float()
    second_copy_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), ids[:, period + 1:].to(device).flatten())
    second = torch.arange(period, 2 * period)
    previous = torch.arange(1, 2 * period)
    prefix = torch.stack([a[:, :, second, second - period + 1].mean(dim=(0, 2))
                          for a in attentions])
    prev = torch.stack([a[:, :, previous, previous - 1].mean(dim=(0, 2)) for a in attentions])
    return {"prefix_matching": prefix.cpu().numpy(), "previous_token": prev.cpu().numpy(),
            "second_copy_loss": second_copy_loss.cpu().numpy()}


class HeadScoresCallback(TrainerCallback):
    """Logs every head's prefix-matching and previous-token scores on a schedule, into a
    TensorBoard run directory (``heads/prefix_matching/l{i}h{j}``, ...), and keeps them."""

    def __init__(self, schedule: Schedule, vocab: int, log_dir: Path | None = None) -> None:
        self.schedule, self.vocab, self.log_dir = schedule, vocab, log_dir
        self.history: dict[int, dict[str, np.ndarray]] = {}
        self._writer: SummaryWriter | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._planned = self.schedule.planned_steps(state.max_steps)
        if 0 in self._planned and state.global_step == 0:
            self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self._planned:
            self._record(state.global_step, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.schedule.at_end and state.global_step not in self.history:
            self._record(state.global_step, model)
        if self._writer is not None:
            self._writer.close()

    def _record(self, step: int, model: torch.nn.Module) -> None:
        scores = attention_scores(model, self.vocab)
        self.history[step] = scores
        if self.log_dir is None:
            return
        if self._writer is None:
            self._writer = SummaryWriter(str(self.log_dir), filename_suffix=".heads")
        self._writer.add_scalar("heads/second_copy_loss", float(scores["second_copy_loss"]),
                                step)
        for kind in ("prefix_matching", "previous_token"):
            for (layer, head), value in np.ndenumerate(scores[kind]):
                self._writer.add_scalar(f"heads/{kind}/l{layer}h{head}", float(value), step)
        self._writer.flush()
