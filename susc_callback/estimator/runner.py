"""The chain runner: the SGLD step loop of every prefix group of a plan.

All chains with index ``c`` draw the same minibatches (seeded by ``(seed, c)``), so each
minibatch's frozen prefix is computed once per step and shared by every component of the
group; the noise of a component's chain is seeded by ``(seed, "noise", name, c)``. Only
the component's parameters require grad, so backward stops at the component; the update
and its noise touch only the component's entries.

A group runs its chain indices in *chain batches* (:class:`~.plan.GroupPlan`'s
``chain_batch``): usually one index at a time; several where every chain sees the whole
data set, so that all of them advance as one stacked pass. Each component's chains of a
batch are one :class:`~susc_callback.sampler.sgld.ChainBank`, updated, summed and checked
for divergence as ``(chains, ...)`` tensors, with no per-chain Python in the step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from susc_callback.config import SGLDConfig
from susc_callback.data.sampling import EpochSampler, SamplingData
from susc_callback.estimator.moments import LossCrossMoments
from susc_callback.estimator.observable import ChainObservable, finite_set_kappa
from susc_callback.estimator.plan import FULL, EstimatePlan, OptimumDraw
from susc_callback.estimator.stacking_policy import StackLimit, refuse_stacking
from susc_callback.estimator.sums import DrawSums
from susc_callback.sampler.divergence import ChainDivergedError, DivergenceWatch
from susc_callback.sampler.group import Captured, ChainStep, GroupLosses
from susc_callback.sampler.sgld import ChainBank, chain_banks, chain_seed, make_generator
from susc_callback.sampler.stacking import StackingUnsupported

DIVERGENCE_READ_EVERY = 16  # steps between reads of the divergence flags (each waits for
                            # the device)
Evaluated = list[tuple[ChainBank, ChainStep]]


class ChainRunner:
    """Runs chains of a plan and sums their draws.

    Its own state, which the plan does not hold: the components that failed, the groups
    that fell back to one chain at a time, and each group's stack limit after
    out-of-memory halving.
    ``moments`` (a factory) gives every component's sums cross-moments of the probe losses.
    """

    def __init__(self, plan: EstimatePlan, data: SamplingData, config: SGLDConfig,
                 device: torch.device,
                 moments: Callable[[], LossCrossMoments] | None = None) -> None:
        self.plan, self.data, self.config, self.device = plan, data, config, device
        self.moments = moments
        self.params = dict(plan.model.named_parameters())
        self.failed: dict[str, str] = {}
        self.stacked = [group.stacked for group in plan.groups]  # names of stacked members
        # A chain batch is sized by memory when planned and runs as one pass
        self.limits = [StackLimit(plan.stack_limit if group.chain_batch == 1 else
                                  group.chain_batch * len(group.members), device)
                       for group in plan.groups]

    def run(self, chain_indices: list[int], progress: Callable[[int], None]
            ) -> dict[str, DrawSums]:
        """Chains ``chain_indices`` of every group; their draws in fresh sums."""
        cfg = self.config
        kappa = finite_set_kappa(cfg, len(self.data))
        sums = {c.name: DrawSums(self.plan.num_tokens, cfg.num_chains, cfg.num_draws,
                                 self.device, self.moments() if self.moments else None, kappa)
                for c in self.plan.components}
        for group_index, group in enumerate(self.plan.groups):
            size = group.chain_batch
            for start in range(0, len(chain_indices), size):
                self._run_chains(group_index, chain_indices[start:start + size], sums,
                                 progress)
        return sums

    def _run_chains(self, group_index: int, chain_indices: list[int],
                    sums: dict[str, DrawSums], progress: Callable[[int], None]) -> None:
        """Chains ``chain_indices`` of every member of a group, advanced together (more
        than one chain index only where they share every minibatch and observable)."""
        cfg, group = self.config, self.plan.groups[group_index]
        observable = ChainObservable(cfg, self.data, group.losses, chain_indices[0],
                                     self.plan.anchor, self.device)
        members = [c for c in group.members if c.name not in self.failed]
        banks = chain_banks(members, self.params, cfg.seed, chain_indices, self.device)
        batches = MinibatchStream(self.data, cfg, chain_indices[0], group.losses, self.device)
        watch = DivergenceWatch(cfg.num_steps, self.device)
        for step_index in range(cfg.num_steps):
            batch, hidden = batches.next()
            draw = cfg.draw_at(step_index)
            with torch.no_grad():
                observable.at(draw, batch, hidden)
            shared_draw = self.plan.optimum_draw if step_index == 0 else None
            evaluate_draw = draw is not None and shared_draw is None
            step = (group_index, batch, hidden, evaluate_draw, observable.chunks)
            try:
                evaluated = self._evaluate(banks, *step)
            except Exception:
                # A chain that diverged since the last read may have made a loss_fn raise
                # on its non-finite weights: report it and retry the step without it
                # (evaluation changes no chain state).
                diverged = watch.diverged(step_index)
                if not diverged:
                    raise
                banks = self._drop_diverged(banks, diverged, sums, watch)
                evaluated = self._evaluate(banks, *step)
            if shared_draw is not None:
                _share_draw(evaluated, shared_draw, observable)
            for bank, output in evaluated:
                self._advance(bank, output, step_index, draw, observable, sums[bank.name],
                              watch)
            if (step_index + 1) % DIVERGENCE_READ_EVERY == 0 or step_index + 1 == cfg.num_steps:
                banks = self._drop_diverged(banks, watch.diverged(step_index + 1), sums, watch)
            progress(len(members) * len(chain_indices))

    def _evaluate(self, banks: list[ChainBank], group_index: int, batch: dict,
                  hidden: torch.Tensor | None, draw: bool, observable: Captured | None
                  ) -> Evaluated:
        """Every bank's step outputs (at a draw, ``L`` over ``observable``; None: the
        minibatch). The group's stacked banks run stacked in parts of the stack limit, the
        others one chain at a time."""
        losses = self.plan.groups[group_index].losses
        stacked = self.stacked[group_index]
        pairs: Evaluated = []
        rest = [bank for bank in banks if bank.name not in stacked]
        if stacked:
            together = [bank for bank in banks if bank.name in stacked]

            def evaluate(part: list[ChainBank]) -> list[ChainStep]:
                return losses.evaluate_stacked(part, batch, hidden, draw, observable)

            done = 0
            try:
                for part, outputs in self.limits[group_index].parts(together, evaluate):
                    pairs += zip(part, outputs)
                    done += len(part)
            except StackingUnsupported as error:
                refuse_stacking(self.config, str(error))
                self.stacked[group_index] = frozenset()  # for the group's later chains too
            rest = together[done:] + rest
        return pairs + list(zip(rest, losses.evaluate_sequential(rest, batch, hidden, draw,
                                                                 observable)))

    def _advance(self, bank: ChainBank, output: ChainStep, step_index: int, draw: int | None,
                 observable: ChainObservable, sums: DrawSums, watch: DivergenceWatch) -> None:
        """Record a draw and apply the SGLD update; non-finite values are flagged in
        ``watch`` (a diverged chain's draws only reach its own component's sums)."""
        cfg = self.config
        if draw is not None:
            sums.add(bank.chain_index, draw, output.observable, observable.anchor,
                     output.tokens, bank.mean_squared_displacement(),
                     observable.diagonal(output.sequence_losses))
        bank.step(output.grads, step_size=cfg.step_size, n_beta=cfg.n_beta, gamma=cfg.gamma)
        watch.record(bank.name, bank.chains, step_index,
                     output.observable if draw is not None else None,
                     output.tokens if draw is not None else None, output.loss, bank.state)

    def _drop_diverged(self, banks: list[ChainBank],
                       diverged: list[tuple[str, int, int, str]], sums: dict[str, DrawSums],
                       watch: DivergenceWatch) -> list[ChainBank]:
        """Report diverged chains, earliest first (raising where ``on_divergence`` or the
        full chain requires it), blank their draws from the first bad step on, and return
        the banks of the other components (a component with a diverged chain fails)."""
        cfg = self.config
        for name, chain, bad_step, problem in sorted(diverged, key=lambda found: found[2]):
            error = ChainDivergedError(name, chain, bad_step, problem)
            if cfg.on_divergence == "raise" or name == FULL:
                raise error
            self.failed.setdefault(name, str(error))
            warnings.warn(str(error), RuntimeWarning, stacklevel=3)
            first_bad_draw = -(-max(bad_step - cfg.num_burnin, 0) // cfg.steps_between_draws)
            for trace in (sums[name].loss_trace, sums[name].probe_trace):
                trace[chain, first_bad_draw:] = float("nan")
            watch.forget(name)
        names = {found[0] for found in diverged}
        return [bank for bank in banks if bank.name not in names]


class MinibatchStream:
    """The minibatches of chain ``chain_index`` (seeded by ``(seed, "batches", chain)``)
    with their frozen prefix's outputs. With ``batch_size >= N`` every step's minibatch
    is the whole data set in its order, the same for every chain: collated and captured
    once."""

    def __init__(self, data: SamplingData, config: SGLDConfig, chain_index: int,
                 losses: GroupLosses, device: torch.device) -> None:
        self.data, self.losses, self.device = data, losses, device
        self.whole = config.batch_size >= len(data)
        self.fixed: tuple[dict, torch.Tensor | None] | None = None
        self.sampler = EpochSampler(len(data), config.batch_size, make_generator(
            torch.device("cpu"), chain_seed(config.seed, "batches", chain_index)))

    def next(self) -> tuple[dict, torch.Tensor | None]:
        if self.whole and self.fixed is not None:
            return self.fixed
        indices = torch.arange(len(self.data)) if self.whole else self.sampler.next()
        batch = self.data.batch(indices, self.device)
        with torch.no_grad():
            pair = (batch, self.losses.capture(batch))
        if self.whole:
            self.fixed = pair
        return pair


def _share_draw(evaluated: Evaluated, draw: OptimumDraw, observable: ChainObservable
                ) -> None:
    """Give every chain's step the same draw at ``w*``, evaluated once. Its observable
    loss is the plan's fixed set's, else the chain's own set's ``L(w*)``, else (the
    minibatch observable) each chain's minibatch loss."""
    value = draw.observable
    if value is None and observable.chunks is not None:
        value = observable.anchor
    for _, output in evaluated:
        count = len(output.loss)
        output.observable = output.loss if value is None else value.expand(count)
        output.tokens = draw.tokens.expand(count, -1)
        output.sequence_losses = None if observable.sequence_optimum is None else \
            observable.sequence_optimum.expand(count, -1)
