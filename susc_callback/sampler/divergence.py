"""Detecting chains that diverged, without waiting for the device at every step."""

from __future__ import annotations

import torch

WATCHED = ("observable loss", "probe token losses", "minibatch loss", "weights")
"""What is checked for non-finite values, in the order of :meth:`DivergenceWatch.record`."""


class ChainDivergedError(RuntimeError):
    """An SGLD chain produced a non-finite loss or weights."""

    def __init__(self, component: str, chain: int, step: int, what: str) -> None:
        self.component, self.chain, self.step, self.what = component, chain, step, what
        hint = ("Lower step_size or raise gamma (or lower n_beta) in SGLDConfig." if step else
                "At step 0 the weights are still the checkpoint's, so no step size can help: "
                "the checkpoint or its loss on this minibatch is non-finite, or the minibatch "
                "has no valid target token.")
        super().__init__(
            f"SGLD chain {chain} of component {component!r} diverged at step {step}: {what}. "
            + hint)

    def __reduce__(self):  # raised again in the parent when a chain worker hits it
        return type(self), (self.component, self.chain, self.step, self.what)


class DivergenceWatch:
    """Non-finite losses and weights of the chains of a group, flagged on the device.

    Reading a flag makes the host wait for the device; on a GPU that drains the queue of
    launched work at every read. So each chain's step writes the largest magnitude of each
    watched value (non-finite exactly when some entry is) into a device tensor, and
    :meth:`diverged` reads all chains' steps since the last read at once. A chain that
    diverged in between computes on with non-finite numbers that touch no other chain:
    stacked chains share no rows, and its draws only enter its own component's sums.
    """

    def __init__(self, num_steps: int, device: torch.device) -> None:
        self.num_steps, self.device = num_steps, device
        self.magnitudes: dict[str, torch.Tensor] = {}  # chain -> (steps, len(WATCHED))
        self.read_up_to = 0
        self._zero = torch.zeros((), dtype=torch.float64, device=device)

    def record(self, chain: str, step: int, observable: torch.Tensor | None,
               tokens: torch.Tensor | None, loss: torch.Tensor,
               weights: list[torch.Tensor]) -> None:
        """One step of one chain; ``observable`` and ``tokens`` only at a draw."""
        if chain not in self.magnitudes:
            self.magnitudes[chain] = torch.zeros((self.num_steps, len(WATCHED)),
                                                 dtype=torch.float64, device=self.device)
        losses = [loss] if observable is None else [observable, tokens, loss]
        # max |value| of every tensor, in one multi-tensor kernel: NaN or inf exactly when
        # some entry is
        largest = torch.stack(torch._foreach_norm([v.detach() for v in losses + list(weights)],
                                                  float("inf")))
        draw = [self._zero, self._zero] if observable is None else [largest[0], largest[1]]
        count = len(losses)
        self.magnitudes[chain][step] = torch.stack([*draw, largest[count - 1],
                                                    largest[count:].amax()])

    def diverged(self, up_to: int) -> list[tuple[str, int, str]]:
        """``(chain, first bad step, what)`` for every chain with a non-finite value in the
        steps recorded before ``up_to`` and not yet read; each chain is reported once."""
        if up_to <= self.read_up_to or not self.magnitudes:
            return []
        names = list(self.magnitudes)
        block = torch.stack([self.magnitudes[n][self.read_up_to:up_to] for n in names])
        bad = (~torch.isfinite(block)).cpu()  # the one wait for the device
        found = []
        for name, flags in zip(names, bad):
            steps = flags.any(dim=1).nonzero()
            if len(steps):
                step = int(steps[0])
                what = WATCHED[int(flags[step].nonzero()[0])]
                found.append((name, self.read_up_to + step, f"non-finite {what}"))
                del self.magnitudes[name]
        self.read_up_to = up_to
        return found

