"""``estimate_susceptibilities``: the engine's one entry point.

Work plan, designed to do less work rather than the same work faster:

* Sampling runs on a private float32 eval-mode snapshot; the caller's model, its flags and
  every global RNG stream are left exactly as they were (also when an error is raised).
  Activations the snapshot spells out elementwise (GPT-2's ``gelu_new``) are replaced by
  faster equivalents of the same function (:mod:`susc_callback.sampler.activations`).
* Components are grouped by their *frozen prefix*: the number of transformer blocks that
  run before any of their parameters is used. Within a group, the probe's and the
  observable set's activations after that prefix are computed once per group and replayed
  at every draw, and each SGLD minibatch's prefix is computed once per step and shared by
  every component of the group (all chains with index c draw the same minibatches, seeded
  by (seed, c); the noise of a component's chain is seeded by (seed, name, c)).
* Only the component's parameters require grad, so backward stops at the component and
  computes no other weight gradients; the update and its noise touch only the component's
  entries.
* The restricted chains of a group are stacked into one batch where that is exact
  (:mod:`susc_callback.sampler.stacking`): one forward and backward pass for all of them.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from susc_callback.components.architectures import block_list_path
from susc_callback.components.component import (
    ResolvedComponent,
    canonical_parameter_names,
    resolve_components,
)
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.data.sampling import LossFn, SamplingData, token_losses
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.estimator.sums import DrawSums, susceptibilities
from susc_callback.estimator.workers import fork_is_safe, run_forked
from susc_callback.sampler.activations import swap_activations
from susc_callback.sampler.divergence import DivergenceWatch
from susc_callback.sampler.group import ChainStep, GroupLosses
from susc_callback.sampler.isolation import ieee_float32, preserved_rng_state
from susc_callback.sampler.prefix import PrefixReplay
from susc_callback.sampler.sgld import RestrictedChain, chain_seed, make_generator
from susc_callback.sampler.stacking import StackingUnsupported, stacking_blocker

FULL = "full"
DIVERGENCE_READ_EVERY = 16  # steps between reads of the divergence flags (each waits for
                            # the device)


class ChainDivergedError(RuntimeError):
    """An SGLD chain produced a non-finite loss or weights."""

    def __init__(self, component: str, chain: int, step: int, what: str) -> None:
        self.component, self.chain, self.step, self.what = component, chain, step, what
        super().__init__(
            f"SGLD chain {chain} of component {component!r} diverged at step {step}: {what}. "
            "Lower step_size or raise gamma (or lower n_beta) in SGLDConfig.")

    def __reduce__(self):  # raised again in the parent when a chain worker hits it
        return type(self), (self.component, self.chain, self.step, self.what)


def estimate_susceptibilities(
    model: nn.Module,
    components: Any,
    sampling_data: Any,
    probe: ProbeSet,
    config: SGLDConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    collate_fn: Callable | None = None,
    step: int | None = None,
) -> SusceptibilityResult:
    """Per-token susceptibilities of every component on every probe token.

    Args:
        model: any ``nn.Module`` at the checkpoint ``w*``; never modified.
        components: None (every attention head of a supported HF causal LM), a preset name
            (``"heads"``, ``"attention"``, ``"mlp"``, ``"layers"``, ``"embedding"``,
            ``"unembedding"``, comma-separated), :class:`Component` objects, or
            ``{name: {parameter name: bool mask or None}}``.
        sampling_data: the data SGLD samples with: an ``(N, T)`` token-id tensor, a dict of
            tensors with a common first dimension, or a sequence of examples (with
            ``collate_fn``).
        probe: the probe sequences whose per-token losses are observed.
        config: SGLD and estimator hyperparameters (default :class:`SGLDConfig`).
        loss_fn: ``loss_fn(model, batch) -> (B,) or (B, K)`` per-sample losses (optionally
            ``(losses, valid_mask)``); default: next-token cross-entropy of a causal LM.
        collate_fn: collates examples of ``sampling_data`` into a batch dict.
        step: training step of the checkpoint, stored in the result.

    Returns:
        A :class:`SusceptibilityResult` with ``chi`` of shape (components, probe tokens);
        negative entries mean the component expresses the token's pattern.
    """
    config = config or SGLDConfig()
    device = torch.device(config.device) if config.device else _model_device(model)
    # Gradients are needed even when the caller is inside no_grad() or inference_mode().
    with preserved_rng_state(device), ieee_float32(), torch.inference_mode(False), \
            torch.enable_grad():
        resolved, data = check_inputs(model, components, sampling_data, probe, config,
                                      collate_fn=collate_fn)  # collating may draw randoms
        snapshot = _float32_snapshot(model, device)
        run = _Run(snapshot, resolved, data, probe, config, loss_fn, device)
        return run.execute(step)


def check_inputs(model: nn.Module, components: Any, sampling_data: Any, probe: ProbeSet,
                 config: SGLDConfig, *, collate_fn: Callable | None = None
                 ) -> tuple[list[ResolvedComponent], SamplingData]:
    """Everything that can be checked without sampling; raises a clear ``ValueError`` or
    ``TypeError``. Returns the resolved components and the sampling data."""
    if not isinstance(probe, ProbeSet):
        raise TypeError(f"probe must be a ProbeSet, got {type(probe).__name__}")
    if not isinstance(config, SGLDConfig):
        raise TypeError(f"config must be an SGLDConfig, got {type(config).__name__}")
    resolved = resolve_components(model, components)
    data = sampling_data if isinstance(sampling_data, SamplingData) else SamplingData(
        sampling_data, collate_fn)
    _check_data_size(len(data), config)
    cpu = torch.device("cpu")
    _check_fits_model(model, probe.batch(0, len(probe), cpu), "probe")
    ids = data.column("input_ids")
    sample = {"input_ids": ids} if ids is not None else data.batch(
        torch.arange(config.batch_size), cpu)
    if not isinstance(sample, dict):
        raise TypeError(f"sampling_data batches must be dicts of tensors, got "
                        f"{type(sample).__name__}; pass a collate_fn that returns one")
    _check_fits_model(model, sample, "sampling_data")
    return resolved, data


def _check_data_size(size: int, config: SGLDConfig) -> None:
    needed = {"batch_size": config.batch_size}
    if config.observable == "fixed" or config.anchor == "separate-batches":
        needed["observable_sequences"] = config.observable_sequences
    if config.anchor == "separate-batches":
        needed["2 * observable_sequences (separate anchor set)"] = 2 * config.observable_sequences
    for what, count in needed.items():
        if size < count:
            raise ValueError(f"sampling_data has {size} sequences, fewer than {what} = {count}")


def _check_fits_model(model: nn.Module, batch: dict, what: str) -> None:
    """Token ids within the vocabulary and sequences within the context of a HF model."""
    config, ids = getattr(model, "config", None), batch.get("input_ids")
    if config is None or not isinstance(ids, torch.Tensor) or ids.numel() == 0:
        return
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"{what} holds token ids in [{int(ids.min())}, {int(ids.max())}], "
                         f"outside the model's vocabulary [0, {vocab - 1}]")
    context = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None)
    if context is not None and ids.shape[-1] > context:
        raise ValueError(f"{what} sequences have {ids.shape[-1]} tokens, more than the model's "
                         f"context of {context}; truncate them (e.g. max_length={context})")


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    raise ValueError("The model has no parameters")


def _float32_snapshot(model: nn.Module, device: torch.device) -> nn.Module:
    """A private float32 eval-mode copy with frozen parameters and faster activations."""
    snapshot = deepcopy(model).to(device=device, dtype=torch.float32).eval()
    for param in snapshot.parameters():
        param.requires_grad_(False)
        param.grad = None
    swap_activations(snapshot)
    return snapshot


@dataclass
class _GroupPlan:
    """What every chain of a prefix group shares (see :meth:`_Run._plan_group`)."""

    members: list[ResolvedComponent]
    group: GroupLosses
    stacked: bool


class _Run:
    """One estimate: groups components by frozen prefix and runs their chains in lockstep."""

    def __init__(self, model: nn.Module, components: list[ResolvedComponent],
                 data: SamplingData, probe: ProbeSet, config: SGLDConfig,
                 loss_fn: LossFn | None, device: torch.device) -> None:
        self.model, self.data, self.probe, self.config = model, data, probe, config
        self.device, self.loss_fn = device, loss_fn
        self.params = dict(model.named_parameters())
        path = block_list_path(model)
        self.prefix = PrefixReplay(model, model.get_submodule(path) if path else None)
        full = ResolvedComponent(FULL, {name: None for name in self.params},
                                 sum(p.numel() for p in self.params.values()), True)
        self.components = [*components, full]
        self.stacked = False  # whether the current group's chains are stacked
        self.batch_limit = config.max_batched_chains
        # A CPU gains nothing from passes larger than eval_batch_size rows (they only miss
        # caches), so stacked chains share them; a GPU wants the largest passes that fit.
        self.max_rows = config.eval_batch_size if device.type == "cpu" else None
        self.probe_chunks = [probe.batch(i, i + config.eval_batch_size, device)
                             for i in range(0, len(probe), config.eval_batch_size)]
        order = torch.randperm(len(data), generator=make_generator(
            torch.device("cpu"), chain_seed(config.seed, "observable")))
        m = config.observable_sequences
        self.observable_chunks = self._chunks(order[:m])
        self.anchor_chunks = self._chunks(order[m:2 * m])
        if data.column("input_ids") is None:  # tensor data was checked whole already
            for chunk in self.observable_chunks + self.anchor_chunks:
                _check_fits_model(model, chunk, "sampling_data")
        self.failed: dict[str, str] = {}
        self.anchor: torch.Tensor | None = None  # L(w*); None: each draw's minibatch at w*
        self.checkpoint: tuple[torch.Tensor | None, torch.Tensor] | None = None

    def _chunks(self, indices: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        size = self.config.eval_batch_size
        return [self.data.batch(indices[i:i + size], self.device)
                for i in range(0, len(indices), size)]

    def _losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return token_losses(self.loss_fn, self.model, batch)

    def _group_losses(self, depth: int, observable_chunks: list[dict]) -> GroupLosses:
        return GroupLosses(self.model, self.loss_fn, self.prefix, depth, self.probe_chunks,
                           self.probe_valid, observable_chunks, self.max_rows)

    # -- plan -------------------------------------------------------------------------------

    def _groups(self) -> dict[int, list[ResolvedComponent]]:
        """Components keyed by how many leading blocks they leave frozen."""
        frozen = self.prefix.frozen_blocks(lambda: self._losses(self.probe_chunks[0]))
        aliases: dict[str, list[str]] = {}
        for alias, name in canonical_parameter_names(self.model).items():
            aliases.setdefault(name, []).append(alias)
        groups: dict[int, list[ResolvedComponent]] = {}
        for component in self.components:
            depth = min(frozen.get(alias, 0) for name in component.entries
                        for alias in aliases[name])
            groups.setdefault(depth, []).append(component)
        return dict(sorted(groups.items()))

    def _probe_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(sequence, position) of every probe token, from the validity masks at w*."""
        self.probe_valid, sequences, positions = [], [], []
        start = 0
        with torch.no_grad():
            for chunk in self.probe_chunks:
                _, valid = self._losses(chunk)
                self.probe_valid.append(valid)
                rows, cols = valid.nonzero(as_tuple=True)
                sequences.append(rows.cpu() + start)
                positions.append(cols.cpu())
                start += valid.shape[0]
        if sum(len(s) for s in sequences) == 0:
            raise ValueError("The probe set has no valid tokens (all masked or too short)")
        return torch.cat(sequences).numpy(), torch.cat(positions).numpy()

    # -- sampling ---------------------------------------------------------------------------

    def execute(self, step: int | None) -> SusceptibilityResult:
        token_sequence, token_position = self._probe_layout()
        self.num_tokens = len(token_sequence)
        cfg = self.config
        self._evaluate_optimum()
        plans = [self._plan_group(depth, members) for depth, members in self._groups().items()]
        workers = self._workers()
        total = len(self.components) * cfg.num_chains * cfg.num_steps
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        with tqdm(total=total, disable=not show, desc="SGLD", unit="step") as bar:
            if workers == 1:
                sums = self._run_chains(plans, list(range(cfg.num_chains)), bar.update)
            else:
                shares = [list(range(cfg.num_chains))[k::workers] for k in range(workers)]
                parts = run_forked(lambda share, progress: (
                    self._run_chains(plans, share, progress), self.failed), shares, bar.update)
                sums = parts[0][0]
                for share, (part, failed) in zip(shares, parts):
                    self.failed.update(failed)
                    for name, part_sums in part.items():
                        if part_sums is not sums[name]:
                            sums[name].merge(part_sums, share)
        return self._result(sums, token_sequence, token_position, step)

    def _workers(self) -> int:
        """Processes that run chains at the same time (``SGLDConfig.workers``)."""
        cfg = self.config
        if cfg.workers == "auto":
            count = min(cfg.num_chains, torch.get_num_threads())
            return count if count > 1 and fork_is_safe(self.device) else 1
        count = min(cfg.workers, cfg.num_chains)
        if count > 1 and not fork_is_safe(self.device):
            raise ValueError(f"workers={cfg.workers} needs a CPU device on Linux, in a process "
                             "with no other non-daemon Python thread, outside "
                             "torch.distributed; use workers=1 or 'auto'")
        return count

    def _evaluate_optimum(self) -> None:
        """What every chain of every component shares at ``w*``: the anchor ``L(w*)`` and,
        when the first draw is taken before any update, that draw (the observable loss,
        None when it is each chain's minibatch loss, and the probe token losses)."""
        cfg = self.config
        first_draw_at_optimum = _draw_index(0, cfg) is not None
        needs_observable = cfg.observable == "fixed" and (cfg.anchor == "exact"
                                                         or first_draw_at_optimum)
        with torch.no_grad():
            at_optimum = self._group_losses(
                0, self.observable_chunks if needs_observable else [])
            observable = at_optimum.observable_loss()[0] if needs_observable else None
            if cfg.anchor == "separate-batches":
                self.anchor = self._group_losses(0, self.anchor_chunks).observable_loss()[0]
            else:
                self.anchor = observable
            if first_draw_at_optimum:
                self.checkpoint = observable, at_optimum.probe_losses()[0]

    def _plan_group(self, depth: int, members: list[ResolvedComponent]) -> _GroupPlan:
        """What every chain of a group shares: the replayed prefix, and whether its chains
        are stacked (checked here, once)."""
        fixed = self.config.observable == "fixed"
        with torch.no_grad():
            group = self._group_losses(depth, self.observable_chunks if fixed else [])
        self.stacked = self._stacking_applies(members)
        if self.stacked:  # chains at w*, as every chain starts
            self._check_stacking([c for c in self._chains(members, 0) if c.name != FULL],
                                 group)
        return _GroupPlan(members, group, self.stacked)

    def _chains(self, members: list[ResolvedComponent], chain_index: int
                ) -> list[RestrictedChain]:
        cfg = self.config
        return [RestrictedChain(c, self.params, make_generator(
            self.device, chain_seed(cfg.seed, "noise", c.name, chain_index)))
            for c in members if c.name not in self.failed]

    def _run_chains(self, plans: list[_GroupPlan], chain_indices: list[int],
                    progress: Callable[[int], None]) -> dict[str, DrawSums]:
        """Chains ``chain_indices`` of every group; their draws in fresh sums."""
        cfg = self.config
        sums = {c.name: DrawSums(self.num_tokens, cfg.num_chains, cfg.num_draws, self.device)
                for c in self.components}
        for chain_index in chain_indices:
            for plan in plans:
                self.stacked = plan.stacked
                self._run_chain(plan, chain_index, sums, progress)
                plan.stacked = self.stacked  # a fallback holds for the group's later chains
        return sums

    def _run_chain(self, plan: _GroupPlan, chain_index: int, sums: dict[str, DrawSums],
                   progress: Callable[[int], None]) -> None:
        cfg = self.config
        group, anchor, checkpoint = plan.group, self.anchor, self.checkpoint
        minibatch_observable = cfg.observable == "minibatch"
        chains = self._chains(plan.members, chain_index)
        batches = _EpochSampler(len(self.data), cfg.batch_size,
                                chain_seed(cfg.seed, "batches", chain_index))
        watch = DivergenceWatch(cfg.num_steps, self.device)
        for step_index in range(cfg.num_steps):
            batch = self.data.batch(batches.next(), self.device)
            draw = _draw_index(step_index, cfg)
            with torch.no_grad():
                hidden = group.capture(batch)
                if draw is not None and minibatch_observable and cfg.anchor == "exact":
                    anchor = group.mean([(batch, hidden)])[0]
            at_checkpoint = step_index == 0 and checkpoint is not None
            try:
                evaluated = self._evaluate(chains, group, batch, hidden,
                                           draw is not None and not at_checkpoint)
            except Exception:
                # A chain that diverged since the last read may have made a loss_fn raise
                # on its non-finite weights: report it and retry the step without it
                # (evaluation changes no chain state).
                diverged = watch.diverged(step_index)
                if not diverged:
                    raise
                chains = self._drop_diverged(chains, diverged, chain_index, sums)
                evaluated = self._evaluate(chains, group, batch, hidden,
                                           draw is not None and not at_checkpoint)
            if at_checkpoint:
                _share_draw(evaluated, *checkpoint)
            for chain, output in evaluated:
                self._advance(chain, output, chain_index, step_index, draw, anchor,
                              sums[chain.name], watch)
            if (step_index + 1) % DIVERGENCE_READ_EVERY == 0 or step_index + 1 == cfg.num_steps:
                chains = self._drop_diverged(chains, watch.diverged(step_index + 1),
                                             chain_index, sums)
            progress(len(plan.members))

    def _drop_diverged(self, chains: list[RestrictedChain],
                       diverged: list[tuple[str, int, str]], chain_index: int,
                       sums: dict[str, DrawSums]) -> list[RestrictedChain]:
        """Report diverged chains, earliest first (:meth:`_diverged` raises where it
        must), blank their draws from the first bad step on, and return the others."""
        for name, bad_step, problem in sorted(diverged, key=lambda found: found[1]):
            self._diverged(name, chain_index, bad_step, problem)
            first_bad_draw = -(-max(bad_step - self.config.num_burnin, 0)
                               // self.config.steps_between_draws)
            sums[name].loss_trace[chain_index, first_bad_draw:] = float("nan")
        names = {name for name, _, _ in diverged}
        return [c for c in chains if c.name not in names]

    def _stacking_applies(self, members: list[ResolvedComponent]) -> bool:
        """Whether this group's restricted chains are stacked (``batch_chains``)."""
        cfg = self.config
        restricted = [c for c in members if c.name != FULL]
        if cfg.batch_chains == "off" or not restricted:
            return False
        if cfg.batch_chains == "auto" and (len(restricted) < 2 or self.device.type == "cpu" and
                                           len(restricted) * cfg.batch_size > cfg.eval_batch_size):
            # On a CPU stacking pays where it merges the group's minibatch passes into one
            # of at most eval_batch_size rows; larger passes cost more in cache misses than
            # the per-pass overhead they save.
            return False
        names = list(dict.fromkeys(name for c in restricted for name in c.entries))
        blocker = stacking_blocker(self.model, names)
        if blocker is not None:
            self._stop_stacking(f"only parameters of Linear, Conv1D and LayerNorm modules "
                                  f"can be stacked, and {blocker}")
        return blocker is None

    def _check_stacking(self, chains: list[RestrictedChain], group: GroupLosses) -> None:
        """Check every chain; one that fails turns stacking off for the group."""
        try:
            for _ in self._in_stacks(chains, group.check_stacking):
                pass
        except StackingUnsupported as error:
            self._stop_stacking(str(error))

    def _in_stacks(self, chains: list[RestrictedChain],
                   evaluate: Callable[[list[RestrictedChain]], Any]) -> Iterator[tuple]:
        """``(part, evaluate(part))`` for consecutive parts of at most ``batch_limit``
        chains, the limit halved whenever a part runs out of device memory (evaluation
        changes no chain state, so a retry is exact)."""
        start = 0
        while start < len(chains):
            part = chains[start:start + self.batch_limit]
            try:
                result = evaluate(part)
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                self._shrink_batches(len(part))
                continue
            yield part, result
            start += len(part)

    def _stop_stacking(self, reason: str) -> None:
        """``batch_chains="on"``: a clear error; ``"auto"``: one chain at a time from now
        on (evaluation changes no chain state, so switching is exact)."""
        self.stacked = False
        if self.config.batch_chains == "on":
            raise ValueError(f"batch_chains='on', but this group's chains cannot be stacked: "
                             f"{reason}. Use SGLDConfig(batch_chains='off') or 'auto'")

    def _evaluate(self, chains: list[RestrictedChain], group: GroupLosses, batch: dict,
                  hidden: torch.Tensor | None, draw: bool
                  ) -> list[tuple[RestrictedChain, ChainStep]]:
        """Every chain's step outputs. The full chain runs alone; the others one at a time,
        or stacked (:meth:`_in_stacks`)."""
        minibatch_observable = self.config.observable == "minibatch"
        restricted = [c for c in chains if c.name != FULL]
        full = [c for c in chains if c.name == FULL]
        pairs = list(zip(full, group.evaluate_sequential(full, batch, hidden, draw,
                                                         minibatch_observable)))
        done = 0
        if self.stacked:
            try:
                for part, outputs in self._in_stacks(restricted, lambda part: group.evaluate_stacked(
                        part, batch, hidden, draw, minibatch_observable)):
                    pairs += zip(part, outputs)
                    done += len(part)
            except StackingUnsupported as error:
                self._stop_stacking(str(error))
        rest = restricted[done:]
        return pairs + list(zip(rest, group.evaluate_sequential(rest, batch, hidden, draw,
                                                                minibatch_observable)))

    def _shrink_batches(self, failed_size: int) -> None:
        self.batch_limit = failed_size // 2
        warnings.warn(f"Out of memory with {failed_size} chains in one batch; continuing "
                      f"with {self.batch_limit}", RuntimeWarning, stacklevel=3)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _advance(self, chain: RestrictedChain, output: ChainStep, chain_index: int,
                 step_index: int, draw: int | None, anchor: torch.Tensor, sums: DrawSums,
                 watch: DivergenceWatch) -> None:
        """Record a draw and apply the SGLD update; non-finite values are flagged in
        ``watch`` (a diverged chain's draws only reach its own component's sums)."""
        cfg = self.config
        if draw is not None:
            sums.add(chain_index, draw, output.observable, anchor, output.tokens)
        chain.step(output.grads, step_size=cfg.step_size, n_beta=cfg.n_beta, gamma=cfg.gamma)
        watch.record(chain.name, step_index, output.observable if draw is not None else None,
                     output.tokens if draw is not None else None, output.loss, chain.state)

    def _diverged(self, name: str, chain: int, step: int, problem: str) -> None:
        error = ChainDivergedError(name, chain, step, problem)
        if self.config.on_divergence == "raise" or name == FULL:
            raise error
        self.failed[name] = str(error)
        warnings.warn(str(error), RuntimeWarning, stacklevel=3)

    # -- result -----------------------------------------------------------------------------

    def _result(self, sums: dict[str, DrawSums], token_sequence: np.ndarray,
                token_position: np.ndarray, step: int | None) -> SusceptibilityResult:
        cfg = self.config
        full = sums[FULL]
        names = [c.name for c in self.components if c.name != FULL]
        num_tokens = len(token_sequence)
        chi = np.full((len(names), num_tokens), np.nan)
        mean_phi = np.full(len(names), np.nan)
        for row, name in enumerate(names):
            if name not in self.failed:
                chi[row] = susceptibilities(sums[name], full)
                mean_phi[row] = sums[name].mean_phi()
        datasets = self.probe.dataset_names
        per_sequence = np.array([datasets.index(d) for d in self.probe.datasets])
        token_dataset = per_sequence[token_sequence]
        dataset_chi = np.stack([chi[:, token_dataset == d].mean(axis=1)
                                for d in range(len(datasets))], axis=1)
        ids = self.probe.input_ids
        ids = ids.numpy() if ids is not None else np.zeros((len(self.probe), 0), np.int64)
        mask = self.probe.attention_mask
        mask = mask.numpy() if mask is not None else np.ones_like(ids)
        return SusceptibilityResult(
            component_names=names, chi=chi, dataset_names=datasets, dataset_chi=dataset_chi,
            rllc=cfg.n_beta * mean_phi, llc_full=cfg.n_beta * full.mean_phi(),
            mean_phi=mean_phi,
            anchor_loss=np.array([sums[n].mean_anchor() if self.anchor is None
                                  else float(self.anchor) for n in names]),
            loss_traces=np.stack([sums[n].loss_trace.cpu().numpy() for n in names]),
            full_loss_trace=full.loss_trace.cpu().numpy(),
            token_sequence=token_sequence.astype(np.int64),
            token_position=token_position.astype(np.int64),
            probe_input_ids=ids, probe_attention_mask=mask,
            sequence_datasets=list(self.probe.datasets), config=cfg.to_dict(), step=step,
            failed=dict(self.failed))


def _draw_index(step_index: int, config: SGLDConfig) -> int | None:
    """Index of the draw taken at ``step_index`` (before its update), or None."""
    offset = step_index - config.num_burnin
    if offset < 0 or offset % config.steps_between_draws:
        return None
    return offset // config.steps_between_draws


def _share_draw(evaluated: list[tuple[RestrictedChain, ChainStep]],
                observable: torch.Tensor | None, tokens: torch.Tensor) -> None:
    """Give every chain's step the same draw, evaluated once (``observable`` None: each
    chain's minibatch loss is its observable)."""
    for _, output in evaluated:
        output.observable = output.loss if observable is None else observable
        output.tokens = tokens


class _EpochSampler:
    """Minibatch indices without replacement within an epoch, reshuffled each epoch."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size = size, batch_size
        self.generator = make_generator(torch.device("cpu"), seed)
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(self.size, generator=self.generator)
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return batch
