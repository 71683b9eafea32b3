"""Validated hyperparameters of weight-restricted SGLD and of the estimator."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

ObservableLoss = Literal["fixed", "per-block", "minibatch"]
Anchor = Literal["exact", "separate-batches"]
OnDivergence = Literal["raise", "mark"]
BatchChains = Literal["auto", "on", "off"]


def _estimate(default: Any, help: str) -> Any:
    """A field that defines the estimate: results that differ in it never mix."""
    return field(default=default, metadata={"help": help, "defines_estimate": True})


def _run(default: Any, help: str) -> Any:
    """A field that only says how the estimate is run (same numbers up to float rounding,
    or which failures raise): results that differ only in such fields mix."""
    return field(default=default, metadata={"help": help, "defines_estimate": False})


@dataclass(frozen=True)
class SGLDConfig:
    """Hyperparameters of one susceptibility estimate.

    The SGLD update of a component's entries ``u`` (everything else frozen at ``w*``)::

        u <- u - (step_size / 2) * (n_beta * grad L_batch(u) + gamma * (u - u*))
               + sqrt(step_size) * N(0, I)

    Defaults are the per-token setting of the Structural Inference paper; treat them as a
    starting point and check the chain diagnostics (``docs/engine.md``). Every field has a
    help text (``SGLDConfig.field_help()``) and is marked as defining the estimate or as
    only saying how it is run (:meth:`estimate_settings`).
    """

    step_size: float = _estimate(1e-3, "SGLD step size epsilon (the learning rate).")
    n_beta: float = _estimate(30.0, "Inverse temperature times sample size, n*beta.")
    gamma: float = _estimate(300.0, "Localization strength: pulls the chain back towards w*.")
    num_chains: int = _estimate(
        4, "Independent chains per component (and for the full baseline chain).")
    num_draws: int = _estimate(100, "Draws kept per chain.")
    num_burnin: int = _estimate(0, "SGLD steps discarded before the first draw.")
    steps_between_draws: int | Literal["auto"] = _estimate(
        1,
        "SGLD steps from one draw to the next (the probe is evaluated at draws only, so a "
        "spacing of k costs about k SGLD steps plus one probe evaluation per draw). "
        "'auto': chosen per estimate from the autocorrelation of a short pilot of the "
        "full chain, to get the most effectively independent draws per unit of work "
        "(estimator/spacing.py); the choice is stored in result.extra['draw_spacing'].")
    batch_size: int = _estimate(16, "Sequences per SGLD minibatch.")
    observable: ObservableLoss = _estimate(
        "per-block",
        "What L(w) in phi = L(w) - L(w*) is measured on: 'per-block' (default) = each "
        "block of draws of each chain (the standard errors' units, 4 per chain) its own "
        "random observable_sequences sampling sequences, anchored exactly on them: which "
        "sequences define L then averages out over the blocks and shows in the standard "
        "errors; 'fixed' = the same observable_sequences sequences at every draw of every "
        "chain (the papers' setting; its standard errors miss that choice); "
        "'minibatch' = the draw's SGLD minibatch, with L(w*) evaluated on that same "
        "minibatch.")
    observable_sequences: int = _estimate(
        16, "Size of each observable set (observable='per-block' or 'fixed').")
    unbiased_observable: bool = _estimate(
        True,
        "Remove the bias a finite observable set puts in chi: phi and L averaged over the "
        "same m sequences pair each sequence with itself, a uniform shift of chi of order "
        "1/m. The term is estimated over pairs of distinct sequences instead, with the "
        "finite-population correction for the sampling data's size (no change when the "
        "set is all of it; not for observable='minibatch').")
    anchor: Anchor = _estimate(
        "exact",
        "How L(w*) is measured. 'exact': on the very sequences L(w) is measured on, so "
        "phi(w*) = 0. 'separate-batches': the mean loss at w* of observable_sequences "
        "*other* sampling sequences, which is what devinterp 2.0.1 does (for comparisons "
        "only; it adds a constant offset to phi that biases every susceptibility).")
    eval_batch_size: int = _estimate(
        32,
        "Sequences per forward pass when evaluating probe and observable losses. On a CPU "
        "this bounds every forward pass, stacked chains' copies included (see "
        "batch_chains): larger passes only miss caches there.")
    seed: int = _estimate(
        0, "Seed of the private RNG. Each component's chains are seeded from (seed, name).")
    on_divergence: OnDivergence = _run(
        "raise",
        "A chain whose loss or weights become non-finite: 'raise' an error naming the "
        "component, chain and step, or 'mark' the component as failed (NaN row) and go on.")
    batch_chains: BatchChains = _run(
        "auto",
        "Evaluate the chains of one prefix group *stacked*: one forward and one backward "
        "pass over a batch holding a copy of the inputs per chain, each module that owns a "
        "chain's parameters (Linear, transformers' Conv1D, LayerNorm) applying that "
        "chain's values to its copy. 'auto': stacked wherever that is exact (checked "
        "against one-at-a-time evaluation once per group) and, on a CPU, where the group's "
        "stacked minibatch fits in one pass of eval_batch_size rows (larger passes do not "
        "pay there); else one chain at a time. 'on': stacked, or a clear error; 'off': one "
        "chain at a time. Same numbers either way, up to float rounding.")
    max_batched_chains: int = _run(
        32, "Most chains of a prefix group stacked in one batch; a batch that runs out of "
        "device memory is halved and retried. (Chain batches, where every chain sees the "
        "whole data set, are sized by their activation memory instead.)")
    workers: int | Literal["auto"] = _run(
        "auto",
        "CPU processes that run different chains at the same time (forked, Linux only), "
        "each with an equal share of torch's intra-op threads: small models use two "
        "single-threaded processes better than one process with two threads. 'auto': "
        "min(num_chains, threads) where forking is safe (CPU device, Linux, no other "
        "non-daemon Python thread, not in a daemon process or a torch.distributed group), "
        "else 1. Same numbers either way, up to float rounding; a loss_fn then runs in the "
        "workers, so its side effects on Python objects do not reach the caller.")
    device: str | None = _run(None, "Where to sample; None = the model's own device.")
    progress: bool | Literal["lines"] | None = _run(
        None, "Show a progress bar; 'lines' = a plain line every 30 s (for logs and pipes); "
              "None = a bar only when stderr is a terminal.")

    def __post_init__(self) -> None:
        for name in ("step_size", "n_beta"):
            _check_real(name, getattr(self, name), minimum=0.0, strict=True)
        _check_real("gamma", self.gamma, minimum=0.0, strict=False)
        for name in ("num_chains", "num_draws", "batch_size", "observable_sequences",
                     "eval_batch_size", "max_batched_chains"):
            self._set_int(name, minimum=1)
        if self.steps_between_draws != "auto":
            self._set_int("steps_between_draws", minimum=1, also="'auto' or ")
        self._set_int("num_burnin", minimum=0)
        self._set_int("seed", minimum=0)
        for name, choices in CHOICES.items():
            _check_choice(name, getattr(self, name), choices)
        if not isinstance(self.unbiased_observable, bool):
            raise ValueError(f"Invalid unbiased_observable: {self.unbiased_observable!r} "
                             "(must be True or False)")
        if self.workers != "auto":
            self._set_int("workers", minimum=1, also="'auto' or ")
        if self.observable == "per-block" and self.anchor != "exact":
            raise ValueError("Invalid anchor='separate-batches' with observable='per-block' "
                             "(the default): each block's observable set is anchored on "
                             "itself; use anchor='exact', or observable='fixed' for one "
                             "observable set and a separate anchor set")
        if self.num_draws == 1 and self.num_burnin == 0:
            raise ValueError(
                "Invalid num_draws=1 with num_burnin=0: every chain's only draw would be w* "
                "itself (phi = 0, so every susceptibility 0); use num_draws >= 2 or "
                "num_burnin >= 1")
        if self.num_chains * self.num_draws < 2:
            raise ValueError(
                f"Invalid num_chains={self.num_chains}, num_draws={self.num_draws}: a "
                "covariance needs at least 2 draws in all (num_chains * num_draws >= 2)")
        if self.device is not None:
            object.__setattr__(self, "device", _device_name(self.device))
        if self.progress not in (None, "lines") and not isinstance(self.progress, bool):
            raise ValueError(f"Invalid progress: {self.progress!r} (must be True, False, "
                             "'lines' or None)")

    def _set_int(self, name: str, minimum: int, also: str = "") -> None:
        """Check an integer field and store it as a plain ``int`` (so ``seed=1`` and
        ``seed=numpy.int64(1)`` are one estimate); floats and bools are refused."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                or value < minimum:
            raise ValueError(f"Invalid {name}: {value!r} (must be {also}an integer >= "
                             f"{minimum})")
        object.__setattr__(self, name, int(value))

    @property
    def num_steps(self) -> int:
        """SGLD steps per chain: burn-in plus ``num_draws * steps_between_draws``."""
        return self.num_burnin + self.num_draws * self._spacing()

    def _spacing(self) -> int:
        if self.steps_between_draws == "auto":
            raise ValueError("steps_between_draws='auto' is resolved per estimate "
                             "(susc_callback.estimator.spacing.choose_draw_spacing); this "
                             "config has no spacing yet")
        return self.steps_between_draws

    def draw_at(self, step_index: int) -> int | None:
        """Index of the draw taken at SGLD step ``step_index`` (before its update), or None
        when that step's weights are not kept."""
        offset = step_index - self.num_burnin
        if offset < 0 or offset % self._spacing():
            return None
        return offset // self._spacing()

    def estimate_settings(self) -> dict[str, Any]:
        """The fields that define the estimate (the rest only say how it is run): two
        results belong to one series exactly when these are equal."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata["defines_estimate"]}

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """``{field name: help text}`` in declaration order (e.g. for command-line flags)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SGLDConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown SGLDConfig fields {unknown}; valid: {sorted(known)}")
        return cls(**values)

    def to_json(self, path: str | Path) -> Path:
        """Write the fields that define the estimate as JSON (what ``susc analyze --config``
        and :meth:`from_json` read); returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.estimate_settings(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path, **changes: Any) -> SGLDConfig:
        """A config from a JSON file of fields (e.g. ``susc calibrate``'s
        ``recommended_config.json``), with ``changes`` on top."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read an SGLDConfig from {path}: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object of SGLDConfig fields")
        return cls.from_dict({**values, **changes})

    def replace(self, **changes: Any) -> SGLDConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def tiny(cls, **changes: Any) -> SGLDConfig:
        """A fast preset for tests and smoke runs: 2 chains, 20 draws, batch 8."""
        base = dict(num_chains=2, num_draws=20, batch_size=8, observable_sequences=8)
        return cls(**{**base, **changes})


CHOICES = {"observable": get_args(ObservableLoss), "anchor": get_args(Anchor),
           "on_divergence": get_args(OnDivergence), "batch_chains": get_args(BatchChains)}
"""The valid values of each ``SGLDConfig`` field that takes one of a few strings."""


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"Invalid {name}: {value!r} (valid: {', '.join(map(repr, valid))})")


def _check_real(name: str, value: object, minimum: float, strict: bool) -> None:
    bound = ">" if strict else ">="
    valid = (isinstance(value, numbers.Real) and not isinstance(value, bool)
             and math.isfinite(value) and (value > minimum if strict else value >= minimum))
    if not valid:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number {bound} "
                         f"{minimum:g})")


def _device_name(device: object) -> str:
    """``device`` as the canonical string torch reads (``"cuda:0"``, ``"cpu"``)."""
    import torch

    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"Invalid device: {device!r} (must be None, a string such as "
                         "'cpu' or 'cuda:0', or a torch.device)")
    try:
        return str(torch.device(device))
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"Invalid device: {device!r} ({error})") from None
