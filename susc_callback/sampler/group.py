"""Losses and gradients of one *prefix group* of restricted chains at one SGLD step.

A prefix group is the set of components that leave the same leading blocks frozen. Its
probe and observable-set activations after those blocks are captured once
(:class:`GroupLosses`) and replayed for every chain and draw. Two ways to evaluate the
chains of a group at a step, with the same numbers up to float rounding:

* :meth:`GroupLosses.evaluate_sequential` loads one chain at a time into the shared snapshot;
* :meth:`GroupLosses.evaluate_stacked` runs all of them as one batch of ``G x B`` rows, each module
  that owns a chain's parameters applying that chain's values to its block of rows
  (:mod:`susc_callback.sampler.stacking`): one forward and one backward for ``G`` chains.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from susc_callback.data.rows import batch_rows, repeat_rows, select_rows, take_rows
from susc_callback.data.sampling import LossFn, token_losses
from susc_callback.sampler.prefix import PrefixReplay
from susc_callback.sampler.sgld import ChainBank
from susc_callback.sampler.stacking import StackedModules, StackingUnsupported, parameter_owners


@dataclass
class ChainStep:
    """What the ``n`` chains of a bank need from one step: their minibatch losses ``(n,)``
    and gradients ``(n, d)``, and at a draw the observable losses ``L`` ``(n,)``, probe
    token losses ``l`` ``(n, P)`` and each observable sequence's mean loss ``(n, S)``."""

    loss: torch.Tensor
    grads: torch.Tensor
    observable: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    sequence_losses: torch.Tensor | None = None


Captured = list[tuple[dict, torch.Tensor | None]]
"""Chunks of sequences with their frozen prefix's outputs (:meth:`GroupLosses.captured`)."""
CHECK_SEQUENCES = 2  # probe sequences of the stacking check: what it looks for shows on
                    # any rows (a parameter read outside its module changes every row; a
                    # loss or module mixing rows mixes the stacked chains' copies), so a
                    # couple of sequences do, at a fraction of the cost of a whole chunk


class GroupLosses:
    """Loss evaluations of one prefix group, with its frozen prefix replayed.

    ``depth`` blocks are frozen; the probe's and observable set's activations after them
    are captured at construction, and each minibatch's by :meth:`capture`. Every
    evaluation takes an optional :class:`StackedModules` of ``G`` chains and returns one
    row per chain (one row, at the snapshot's current weights, without it). ``max_rows``
    bounds the rows of one forward pass (None: no bound).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, prefix: PrefixReplay,
                 depth: int, probe_chunks: list[dict], probe_valid: list[torch.Tensor],
                 observable_chunks: list[dict], max_rows: int | None = None) -> None:
        self.model, self.loss_fn, self.max_rows = model, loss_fn, max_rows
        self.prefix, self.depth = prefix, depth
        self.owners = parameter_owners(model)  # which modules stacking patches
        self.probe = [(c, self.capture(c), v.reshape(-1).nonzero().squeeze(1))
                      for c, v in zip(probe_chunks, probe_valid)]
        self.probe_valid = probe_valid
        self.observable = self.captured(observable_chunks)

    def captured(self, chunks: list[dict]) -> Captured:
        """``chunks`` with their frozen prefix's outputs, ready for :meth:`mean`."""
        return [(c, self.capture(c)) for c in chunks]

    def capture(self, batch: dict) -> torch.Tensor | None:
        """The frozen prefix's output on ``batch`` (None when nothing is frozen)."""
        return self.prefix.capture(self.depth, lambda: token_losses(self.loss_fn, self.model,
                                                                    batch))

    def _passes(self, batch: dict, hidden: torch.Tensor | None,
                stack: StackedModules | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Forward passes over ``batch``: per-sample losses and validity ``(G, rows, K)``.

        One chain at a time, the batch is one pass as given. With ``G`` stacked chains every
        row is repeated ``G`` times, in slices of at most ``max_rows`` rows in all."""
        if stack is None:
            with self.prefix.replay(self.depth, hidden):
                losses, valid = token_losses(self.loss_fn, self.model, batch)
            yield losses.unsqueeze(0), valid.unsqueeze(0)
            return
        if any(isinstance(value, (list, tuple)) for value in batch.values()):
            raise StackingUnsupported("the batch holds per-sample values that are not tensors, "
                                      "which cannot be repeated per chain")
        copies, rows = stack.count, batch_rows(batch) or 1
        step = rows if self.max_rows is None else max(1, min(rows, self.max_rows // copies))
        for start in range(0, rows, step):
            size = min(step, rows - start)
            part, part_hidden = batch, hidden
            if size < rows:
                part, part_hidden = (select_rows(value, rows, start, size)
                                     for value in (batch, hidden))
            part, part_hidden = (repeat_rows(value, size, copies) for value in (part, part_hidden))
            with self.prefix.replay(self.depth, part_hidden), stack.applied(size * copies):
                losses, valid = token_losses(self.loss_fn, self.model, part)
            yield losses.reshape(copies, size, -1), valid.reshape(copies, size, -1)

    def token_losses(self, batch: dict, hidden: torch.Tensor | None,
                     stack: StackedModules | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses and validity of ``batch``, flattened to ``(G, B * K)``."""
        losses, valid = zip(*self._passes(batch, hidden, stack))
        if len({part.shape[-1] for part in losses}) > 1:
            raise StackingUnsupported("the loss_fn returns a number of losses per sample that "
                                      "depends on the batch, so a batch cannot be sliced")
        return torch.cat(losses, 1).flatten(1), torch.cat(valid, 1).flatten(1)

    def loss_and_grads(self, batch: dict, hidden: torch.Tensor | None,
                       inputs: list[torch.Tensor], stack: StackedModules | None = None
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean loss of ``batch`` per chain, ``(G,)``, and its gradients with respect to
        ``inputs`` (the loaded parameters, or the ``(G, ...)`` stacked values: row ``j`` is
        chain ``j``'s). Each slice is differentiated as soon as it is computed, so only one
        slice's graph is alive at a time; inputs the loss does not use get zeros."""
        total, count, grads = 0.0, 0, [torch.zeros_like(x) for x in inputs]
        for losses, valid in self._passes(batch, hidden, stack):
            part = torch.where(valid, losses, 0.0).flatten(1).sum(-1)
            if part.requires_grad:
                part_grads = torch.autograd.grad(part.sum(), inputs, allow_unused=True,
                                                 materialize_grads=True)
                grads = [g + p for g, p in zip(grads, part_grads)]
            total = total + part.detach()
            count = count + valid.flatten(1).sum(-1)
        # A batch without a valid token gives NaN (0 / 0), which the divergence watch
        # reports, not a silent zero gradient.
        if stack is None:
            return total / count, [g / count[0] for g in grads]
        return total / count, [g / count.view(-1, *[1] * (g.dim() - 1)) for g in grads]

    def mean(self, chunks: Captured, stack: StackedModules | None = None) -> torch.Tensor:
        """Token-weighted mean loss over ``chunks``, ``(G,)`` float64."""
        totals, counts = self.sequence_totals(chunks, stack)
        return totals.sum(-1) / counts.sum(-1)  # NaN without a valid token, never a silent 0

    def sequence_totals(self, chunks: Captured, stack: StackedModules | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's summed loss and valid-token count over ``chunks``, ``(G, S)``
        float64 both."""
        totals, counts = [], []
        for chunk, hidden in chunks:
            losses, valid = self.token_losses(chunk, hidden, stack)
            rows = batch_rows(chunk) or 1
            totals.append(torch.where(valid, losses, 0.0).double().reshape(
                len(losses), rows, -1).sum(-1))
            counts.append(valid.double().reshape(len(valid), rows, -1).sum(-1))
        return torch.cat(totals, 1), torch.cat(counts, 1)

    def probe_losses(self, stack: StackedModules | None = None) -> torch.Tensor:
        """Per-token probe losses ``(G, P)`` in probe-token order."""
        parts = [self.token_losses(chunk, hidden, stack)[0].index_select(-1, positions)
                 for chunk, hidden, positions in self.probe]
        return torch.cat(parts, dim=-1)

    def _draw_observable(self, losses: torch.Tensor, observable: Captured | None,
                         stack: StackedModules | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draw's observable loss ``(G,)`` and each observable sequence's mean loss
        ``(G, S)``: over ``observable``, or the minibatch loss ``losses`` (and None) when it
        is None."""
        if observable is None:
            return losses, None
        totals, counts = self.sequence_totals(observable, stack)
        return totals.sum(-1) / counts.sum(-1), totals / counts.clamp(min=1)

    def probe_sample(self, count: int) -> tuple[dict, torch.Tensor | None]:
        """The first ``count`` probe sequences of one chunk that have valid tokens (fewer
        if the chunk has fewer), and their captured prefix."""
        for (chunk, hidden, _), valid in zip(self.probe, self.probe_valid):
            rows = valid.reshape(valid.shape[0], -1).any(dim=1).nonzero().squeeze(1)[:count]
            if len(rows):
                return (take_rows(chunk, valid.shape[0], rows),
                        take_rows(hidden, valid.shape[0], rows))
        raise ValueError("The probe set has no valid tokens")

    def evaluate_sequential(self, banks: list[ChainBank], batch: dict,
                            hidden: torch.Tensor | None, draw: bool,
                            observable: Captured | None) -> list[ChainStep]:
        """One chain at a time: load its values, forward/backward, evaluate, restore ``w*``.
        At a draw the observable loss is the mean over ``observable`` (None: the
        minibatch's)."""
        steps = []
        for bank in banks:
            outputs = [self._evaluate_loaded(bank, j, batch, hidden, draw, observable)
                       for j in range(bank.count)]
            steps.append(ChainStep(*(None if values[0] is None else torch.stack(values)
                                     for values in zip(*outputs))))
        return steps

    def _evaluate_loaded(self, bank: ChainBank, j: int, batch: dict,
                         hidden: torch.Tensor | None, draw: bool,
                         observable: Captured | None) -> tuple:
        """Chain ``j`` of ``bank`` alone: loss, gradient (d,), and at a draw the observable,
        probe token and per-sequence losses."""
        bank.load(j)
        try:
            loss, grads = self.loss_and_grads(batch, hidden, bank.params)
            gradient = bank.gather([g[None] for g in grads])[0]
            if not draw:
                return loss[0], gradient, None, None, None
            with torch.no_grad():
                found, sequences = self._draw_observable(loss, observable)
                return (loss[0], gradient, found[0], self.probe_losses()[0],
                        None if sequences is None else sequences[0])
        finally:
            bank.unload()

    def evaluate_stacked(self, banks: list[ChainBank], batch: dict,
                         hidden: torch.Tensor | None, draw: bool,
                         observable: Captured | None) -> list[ChainStep]:
        """All chains of ``banks`` at once, as one batch of ``G x B`` rows over their
        stacked values (copy ``j``: the ``j``-th chain of the banks, in order)."""
        names = list(dict.fromkeys(name for bank in banks for name in bank.names))
        values = {name: _stack(self.model.get_parameter(name), name, banks).requires_grad_()
                  for name in names}
        stack = StackedModules(self.model, values, self.owners)
        losses, grads = self.loss_and_grads(batch, hidden, list(values.values()), stack)
        by_name = dict(zip(names, grads))
        observables = tokens = sequences = None
        if draw:
            with torch.no_grad():
                observables, sequences = self._draw_observable(losses, observable, stack)
                tokens = self.probe_losses(stack)
        steps, start = [], 0
        for bank in banks:
            rows = slice(start, start + bank.count)
            step = ChainStep(losses[rows], bank.gather([by_name[n][rows] for n in bank.names]))
            if draw:
                step.observable, step.tokens = observables[rows], tokens[rows]
                step.sequence_losses = None if sequences is None else sequences[rows]
            steps.append(step)
            start += bank.count
        return steps

    def check_stacking(self, banks: list[ChainBank]) -> None:
        """Raise :class:`StackingUnsupported` unless stacked evaluation of ``banks``
        reproduces one-at-a-time evaluation (mean loss and gradients on ``CHECK_SEQUENCES``
        probe sequences) with the chains moved apart, copy ``j`` of ``G`` shifted by
        ``0.01 (1 + j / G)``. Stacking is exact only when every use of a stacked parameter
        goes through its module's forward on the batch rows and the loss treats samples one
        by one, which module types and call shapes alone cannot prove (e.g. a tied weight
        read directly). What it checks is structural, so a few sequences show it."""
        chunk, hidden = self.probe_sample(CHECK_SEQUENCES)
        states = [bank.state for bank in banks]
        copies = sum(bank.count for bank in banks)
        try:
            start = 0
            for bank in banks:
                shift = 0.01 * (1 + torch.arange(start, start + bank.count,
                                                 device=bank.state.device) / copies)
                bank.state = bank.state + shift[:, None]
                start += bank.count
            sequential = self.evaluate_sequential(banks, chunk, hidden, False, None)
            try:
                stacked = self.evaluate_stacked(banks, chunk, hidden, False, None)
            except (StackingUnsupported, torch.OutOfMemoryError):
                raise
            except Exception as error:  # any other failure means: do not stack
                raise StackingUnsupported(f"stacked evaluation failed "
                                          f"({type(error).__name__}: {error})") from error
        finally:
            for bank, state in zip(banks, states):
                bank.state = state
        for bank, one, other in zip(banks, stacked, sequential):
            same = torch.allclose(one.loss, other.loss, rtol=1e-4, atol=1e-6) and \
                torch.allclose(one.grads, other.grads, rtol=1e-3,
                               atol=1e-4 * float(other.grads.abs().max()))
            if not same:
                raise StackingUnsupported(
                    f"stacked evaluation of {bank.name!r} differs from evaluating it alone "
                    f"(loss {float(one.loss[0]):.6g} vs {float(other.loss[0]):.6g}): a "
                    "parameter of it may be used outside its module's forward, or the loss "
                    "may couple samples")


def _stack(param: torch.Tensor, name: str, banks: list[ChainBank]) -> torch.Tensor:
    """``(G, *shape)``: copy ``j`` holds the ``j``-th chain's (of the banks' chains, in
    order) values of parameter ``name`` (w* where that chain does not own the entries)."""
    copies = sum(bank.count for bank in banks)
    stacked = param.detach().unsqueeze(0).repeat(copies, *([1] * param.dim()))
    start = 0
    for bank in banks:
        if name in bank.names:
            bank.write_into(name, stacked[start:start + bank.count])
        start += bank.count
    return stacked
