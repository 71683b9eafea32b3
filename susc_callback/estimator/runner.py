"""The chain runner: the SGLD step loop of every prefix group of a plan.

All chains with index ``c`` draw the same minibatches (seeded by ``(seed, c)``), so each
minibatch's frozen prefix is computed once per step and shared by every component of the
group; the noise of a component's chain is seeded by ``(seed, name, c)``. Only the
component's parameters require grad, so backward stops at the component; the update and
its noise touch only the component's entries.
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
from susc_callback.sampler.group import Captured, ChainStep
from susc_callback.sampler.sgld import (
    RestrictedChain,
    chain_seed,
    make_generator,
    restricted_chains,
)
from susc_callback.sampler.stacking import StackingUnsupported

DIVERGENCE_READ_EVERY = 16  # steps between reads of the divergence flags (each waits for
                            # the device)
Evaluated = list[tuple[RestrictedChain, ChainStep]]


class ChainRunner:
    """Runs chains of a plan and sums their draws.

    Its own state, which the plan does not hold: the components that failed, the groups
    that fell back to one chain at a time, and the stack limit after out-of-memory halving.
    ``moments`` (a factory) gives every component's sums cross-moments of the probe losses.
    """

    def __init__(self, plan: EstimatePlan, data: SamplingData, config: SGLDConfig,
                 device: torch.device,
                 moments: Callable[[], LossCrossMoments] | None = None) -> None:
        self.plan, self.data, self.config, self.device = plan, data, config, device
        self.moments = moments
        self.params = dict(plan.model.named_parameters())
        self.failed: dict[str, str] = {}
        self.stacked = [group.stacked for group in plan.groups]
        self.limit = StackLimit(plan.stack_limit, device)

    def run(self, chain_indices: list[int], progress: Callable[[int], None]
            ) -> dict[str, DrawSums]:
        """Chains ``chain_indices`` of every group; their draws in fresh sums."""
        cfg = self.config
        kappa = finite_set_kappa(cfg, len(self.data))
        sums = {c.name: DrawSums(self.plan.num_tokens, cfg.num_chains, cfg.num_draws,
                                 self.device, self.moments() if self.moments else None, kappa)
                for c in self.plan.components}
        for chain_index in chain_indices:
            for group_index in range(len(self.plan.groups)):
                self._run_chain(group_index, chain_index, sums, progress)
        return sums

    def _run_chain(self, group_index: int, chain_index: int, sums: dict[str, DrawSums],
                   progress: Callable[[int], None]) -> None:
        cfg, group = self.config, self.plan.groups[group_index]
        observable = ChainObservable(cfg, self.data, group.losses, chain_index,
                                     self.plan.anchor, self.device)
        members = [c for c in group.members if c.name not in self.failed]
        chains = restricted_chains(members, self.params, cfg.seed, chain_index, self.device)
        batches = EpochSampler(len(self.data), cfg.batch_size, make_generator(
            torch.device("cpu"), chain_seed(cfg.seed, "batches", chain_index)))
        watch = DivergenceWatch(cfg.num_steps, self.device)
        for step_index in range(cfg.num_steps):
            batch = self.data.batch(batches.next(), self.device)
            draw = cfg.draw_at(step_index)
            with torch.no_grad():
                hidden = group.losses.capture(batch)
                observable.at(draw, batch, hidden)
            shared_draw = self.plan.optimum_draw if step_index == 0 else None
            evaluate_draw = draw is not None and shared_draw is None
            step = (group_index, batch, hidden, evaluate_draw, observable.chunks)
            try:
                evaluated = self._evaluate(chains, *step)
            except Exception:
                # A chain that diverged since the last read may have made a loss_fn raise
                # on its non-finite weights: report it and retry the step without it
                # (evaluation changes no chain state).
                diverged = watch.diverged(step_index)
                if not diverged:
                    raise
                chains = self._drop_diverged(chains, diverged, chain_index, sums)
                evaluated = self._evaluate(chains, *step)
            if shared_draw is not None:
                _share_draw(evaluated, shared_draw, observable)
            for chain, output in evaluated:
                self._advance(chain, output, chain_index, step_index, draw, observable,
                              sums[chain.name], watch)
            if (step_index + 1) % DIVERGENCE_READ_EVERY == 0 or step_index + 1 == cfg.num_steps:
                chains = self._drop_diverged(chains, watch.diverged(step_index + 1),
                                             chain_index, sums)
            progress(len(group.members))

    def _evaluate(self, chains: list[RestrictedChain], group_index: int, batch: dict,
                  hidden: torch.Tensor | None, draw: bool, observable: Captured | None
                  ) -> Evaluated:
        """Every chain's step outputs (at a draw, ``L`` over ``observable``; None: the
        minibatch). The full chain runs alone; the others one at a time, or stacked in
        parts of the stack limit."""
        losses = self.plan.groups[group_index].losses
        restricted = [c for c in chains if c.name != FULL]
        full = [c for c in chains if c.name == FULL]
        pairs = list(zip(full, losses.evaluate_sequential(full, batch, hidden, draw,
                                                          observable)))
        done = 0
        if self.stacked[group_index]:
            def stacked(part: list[RestrictedChain]) -> list[ChainStep]:
                return losses.evaluate_stacked(part, batch, hidden, draw, observable)

            try:
                for part, outputs in self.limit.parts(restricted, stacked):
                    pairs += zip(part, outputs)
                    done += len(part)
            except StackingUnsupported as error:
                refuse_stacking(self.config, str(error))
                self.stacked[group_index] = False  # for the group's later chains too
        rest = restricted[done:]
        return pairs + list(zip(rest, losses.evaluate_sequential(rest, batch, hidden, draw,
                                                                 observable)))

    def _advance(self, chain: RestrictedChain, output: ChainStep, chain_index: int,
                 step_index: int, draw: int | None, observable: ChainObservable,
                 sums: DrawSums, watch: DivergenceWatch) -> None:
        """Record a draw and apply the SGLD update; non-finite values are flagged in
        ``watch`` (a diverged chain's draws only reach its own component's sums)."""
        cfg = self.config
        if draw is not None:
            sums.add(chain_index, draw, output.observable, observable.anchor, output.tokens,
                     chain.mean_squared_displacement(),
                     observable.diagonal(output.sequence_losses))
        chain.step(output.grads, step_size=cfg.step_size, n_beta=cfg.n_beta, gamma=cfg.gamma)
        watch.record(chain.name, step_index, output.observable if draw is not None else None,
                     output.tokens if draw is not None else None, output.loss, chain.state)

    def _drop_diverged(self, chains: list[RestrictedChain],
                       diverged: list[tuple[str, int, str]], chain_index: int,
                       sums: dict[str, DrawSums]) -> list[RestrictedChain]:
        """Report diverged chains, earliest first (raising where ``on_divergence`` or the
        full chain requires it), blank their draws from the first bad step on, and return
        the others."""
        cfg = self.config
        for name, bad_step, problem in sorted(diverged, key=lambda found: found[1]):
            error = ChainDivergedError(name, chain_index, bad_step, problem)
            if cfg.on_divergence == "raise" or name == FULL:
                raise error
            self.failed[name] = str(error)
            warnings.warn(str(error), RuntimeWarning, stacklevel=3)
            first_bad_draw = -(-max(bad_step - cfg.num_burnin, 0) // cfg.steps_between_draws)
            for trace in (sums[name].loss_trace, sums[name].probe_trace):
                trace[chain_index, first_bad_draw:] = float("nan")
        names = {name for name, _, _ in diverged}
        return [c for c in chains if c.name not in names]


def _share_draw(evaluated: Evaluated, draw: OptimumDraw, observable: ChainObservable
                ) -> None:
    """Give every chain's step the same draw at ``w*``, evaluated once. Its observable
    loss is the plan's fixed set's, else the chain's own set's ``L(w*)``, else (the
    minibatch observable) each chain's minibatch loss."""
    value = draw.observable
    if value is None and observable.chunks is not None:
        value = observable.anchor
    for _, output in evaluated:
        output.observable = output.loss if value is None else value
        output.tokens = draw.tokens
        output.sequence_losses = observable.sequence_optimum
