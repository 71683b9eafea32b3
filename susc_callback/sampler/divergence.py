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
        # (component, chains) -> (steps, chains, len(WATCHED)) magnitudes
        self.banks: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.read_up_to = 0
        self.reported: set[tuple[str, int]] = set()

    def record(self, name: str, chains: list[int], step: int,
               observable: torch.Tensor | None, tokens: torch.Tensor | None,
               loss: torch.Tensor, weights: torch.Tensor) -> None:
        """One step of the chains ``chains`` of component ``name``: their losses ``(n,)``,
        weights ``(n, d)`` and, only at a draw, observable ``(n,)`` and probe token losses
        ``(n, P)``."""
        key = (name, tuple(chains))
        if key not in self.banks:
            self.banks[key] = torch.zeros((self.num_steps, len(chains), len(WATCHED)),
                                          dtype=torch.float64, device=self.device)
        largest = self.banks[key][step]
        # max |value| per chain: NaN or inf exactly when some entry is
        if observable is not None:
            largest[:, 0] = observable.detach().abs()
            largest[:, 1] = tokens.detach().abs().amax(-1)
        largest[:, 2] = loss.detach().abs()
        largest[:, 3] = weights.detach().abs().amax(-1)

    def diverged(self, up_to: int) -> list[tuple[str, int, int, str]]:
        """``(component, chain, first bad step, what)`` for every chain with a non-finite
        value in the steps recorded before ``up_to`` and not yet read; each chain is
        reported once."""
        if up_to <= self.read_up_to or not self.banks:
            return []
        keys = list(self.banks)
        blocks = [self.banks[k][self.read_up_to:up_to] for k in keys]
        bad = (~torch.isfinite(torch.cat(blocks, dim=1))).cpu()  # the one wait for the device
        bad_steps = bad.any(dim=2)  # (steps, chains of all banks)
        owners = [(name, chain) for name, chains in keys for chain in chains]
        found = []
        for column in bad_steps.any(dim=0).nonzero().flatten().tolist():
            if owners[column] in self.reported:
                continue
            self.reported.add(owners[column])
            step = int(bad_steps[:, column].nonzero()[0])
            what = WATCHED[int(bad[step, column].nonzero()[0])]
            found.append((*owners[column], self.read_up_to + step, f"non-finite {what}"))
        self.read_up_to = up_to
        return found

    def forget(self, name: str) -> None:
        """Stop reporting the chains of component ``name``."""
        self.banks = {k: v for k, v in self.banks.items() if k[0] != name}
