"""A sweep of SGLD settings at one checkpoint, with short chains, and a recommendation.

Every setting (a step size, an ``n_beta`` and a ``gamma``) is run as a short estimate of
the given components and the full chain. The chains start at ``w*``, so the first half of
each trace (the mean probe loss at every draw) is warm-up; the diagnostics
(:mod:`~susc_callback.analysis.diagnostics`) of the second half decide whether the setting
samples one stationary posterior:

* no chain diverged;
* no trace drifts (``|drift| <= DRIFT_LIMIT`` standard errors: a rising loss means too
  large a step size, a falling one too short a burn-in or a checkpoint away from a
  minimum);
* the chains agree (split R-hat ``<= RHAT_LIMIT``);
* the full model's LLC is positive (``E[phi] > 0``: the chains stay above ``L(w*)``);
* the step is small against the localisation, ``eps gamma <= MAX_STEP_GAMMA``: the chain
  on the localisation alone has a spread ``1 / (1 - eps gamma / 4)`` times the
  posterior's (1.11 at the limit), a bias no diagnostic of the traces can see.

Among the stationary settings the recommendation is the one whose chains mix fastest:
the largest effective sample size of its worst chain group (the smallest over the
components and the full chain), ties going to the earlier setting in the sweep. Its burn-in
is how long the full chain's mean trace takes to reach its second-half level (at least the
config's own). When no setting is stationary there is no recommendation, and the reasons
are reported.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from susc_callback.analysis.diagnostics import TraceDiagnostics, trace_diagnostics
from susc_callback.components.component import Component
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.data.sampling import LossFn
from susc_callback.estimator.engine import estimate_susceptibilities
from susc_callback.sampler.divergence import ChainDivergedError

MAX_STEP_GAMMA = 0.4


@dataclass(frozen=True)
class SettingReport:
    """One setting of the sweep and what its short chains showed.

    ``rhat`` and ``drift`` are the worst over the components and the full chain in the
    second half of the draws, ``ess`` the smallest; ``burnin`` the SGLD steps the full
    chain's mean trace took to reach its second-half level; ``traces`` the full chain's
    ``(chains, draws)`` mean probe loss (None when it diverged). ``problems`` says in words
    why the setting is not stationary (empty when it is)."""

    step_size: float
    n_beta: float
    gamma: float
    rhat: float
    ess: float
    drift: float
    llc: float
    burnin: int
    problems: tuple[str, ...]
    traces: np.ndarray | None

    @property
    def stationary(self) -> bool:
        return not self.problems

    def line(self) -> str:
        """The setting and its verdict in one line."""
        verdict = "stationary" if self.stationary else self.problems[0]
        return (f"eps={self.step_size:g} n_beta={self.n_beta:g} gamma={self.gamma:g}: ESS "
                f"{self.ess:.0f}, drift {self.drift:+.1f}, R-hat {self.rhat:.2f}, LLC "
                f"{self.llc:.3g} - {verdict}")

    def summary(self) -> dict:
        """JSON-safe numbers of the setting (no traces)."""
        values = asdict(self)
        values.pop("traces")
        values["problems"] = list(self.problems)
        values["stationary"] = self.stationary
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in values.items()}


@dataclass(frozen=True)
class Calibration:
    """The sweep's settings, the recommended configuration (None when no setting is
    stationary) and the reason in words."""

    settings: list[SettingReport]
    recommended: SGLDConfig | None
    reason: str

    def save(self, folder: str | Path) -> Path:
        """Write ``calibration.json`` (every setting and the reason) and, when there is a
        recommendation, ``recommended_config.json``: SGLDConfig fields that ``susc analyze
        --config`` and :meth:`SGLDConfig.from_json` read. Returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        report = {"reason": self.reason,
                  "recommended": None if self.recommended is None
                  else self.recommended.estimate_settings(),
                  "settings": [s.summary() for s in self.settings]}
        (folder / "calibration.json").write_text(json.dumps(report, indent=2))
        if self.recommended is not None:
            self.recommended.to_json(folder / "recommended_config.json")
        return folder


def calibrate(model: nn.Module, sampling_data: object, probe: ProbeSet,
              config: SGLDConfig | None = None,
              step_sizes: Sequence[float] = (3e-4, 1e-3, 3e-3),
              n_betas: Sequence[float] = (10.0, 30.0, 100.0),
              gammas: Sequence[float] | None = None,
              components: str | list[Component] | None = None,
              num_chains: int = 2, num_draws: int = 100,
              loss_fn: LossFn | None = None,
              on_setting: Callable[[SettingReport], None] | None = None) -> Calibration:
    """Run every combination of ``step_sizes`` x ``n_betas`` x ``gammas`` (default: the
    config's gamma) with ``num_chains`` x ``num_draws`` chains on ``components`` (default:
    every attention head) and recommend one (module docstring). The recommendation is
    ``config`` with that step size, n_beta and gamma: its own chain and draw counts.
    ``on_setting`` sees each setting's report as soon as it is done (e.g. to print it)."""
    base = config or SGLDConfig()
    gammas = (base.gamma,) if gammas is None else tuple(gammas)
    for name, values in (("step_sizes", step_sizes), ("n_betas", n_betas), ("gammas", gammas)):
        if not len(values):
            raise ValueError(f"calibrate needs at least one value in {name}")
    short = base.replace(num_chains=num_chains, num_draws=num_draws, on_divergence="mark")
    reports = []
    for step_size, n_beta, gamma in itertools.product(step_sizes, n_betas, gammas):
        setting = short.replace(step_size=step_size, n_beta=n_beta, gamma=gamma)
        reports.append(_run_setting(model, sampling_data, probe, setting, components,
                                    loss_fn))
        if on_setting is not None:
            on_setting(reports[-1])
    return _recommend(reports, base)


def _run_setting(model: nn.Module, sampling_data: object, probe: ProbeSet,
                 config: SGLDConfig, components: str | list[Component] | None,
                 loss_fn: LossFn | None) -> SettingReport:
    point = (config.step_size, config.n_beta, config.gamma)
    try:
        result = estimate_susceptibilities(model, components, sampling_data, probe, config,
                                           loss_fn=loss_fn)
    except ChainDivergedError as error:  # the full chain diverged
        return SettingReport(*point, np.nan, np.nan, np.nan, np.nan, 0,
                             (f"diverged: {error}",), None)
    warmup = config.num_draws // 2
    found = trace_diagnostics(result, warmup)
    full = result.diagnostic_traces()[1]
    problems = [f"{name}: {problem}" for name, diagnostics in found.items()
                for problem in diagnostics.problems()]
    problems += [f"{name} diverged" for name in result.failed]
    if config.step_size * config.gamma > MAX_STEP_GAMMA:
        problems.append(
            f"step-size bias: eps gamma = {config.step_size * config.gamma:.2g} > "
            f"{MAX_STEP_GAMMA}, so the chains spread "
            f"{1 / (1 - config.step_size * config.gamma / 4):.2f}x wider than the posterior "
            "wherever the loss is flat")
    if not result.llc_full > 0:
        problems.append(f"the LLC is {result.llc_full:.3g} <= 0: the chains find losses "
                        "below L(w*) (the checkpoint is not at a minimum at this n_beta, "
                        "or the step size is too large)")
    worst = _worst(list(found.values()))
    burnin = _warmup_draws(full, warmup) * config.steps_between_draws
    return SettingReport(*point, worst.rhat, worst.ess, worst.drift, float(result.llc_full),
                         burnin, tuple(problems), full)


def _warmup_draws(traces: np.ndarray, warmup: int) -> int:
    """Draws until the chain-mean trace (smoothed over a twentieth of the draws) first
    reaches the mean level of the draws after ``warmup``, from below or above."""
    mean = np.nanmean(traces, axis=0)
    window = max(1, len(mean) // 20)
    smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
    level = np.nanmean(mean[warmup:])
    reached = smooth >= level if smooth[0] <= level else smooth <= level
    return int(np.argmax(reached)) + window - 1 if reached.any() else warmup


def _worst(found: list[TraceDiagnostics]) -> TraceDiagnostics:
    pick = lambda values, key: max(values, key=key) if values else float("nan")  # noqa: E731
    finite = lambda name: [getattr(d, name) for d in found  # noqa: E731
                           if np.isfinite(getattr(d, name))]
    return TraceDiagnostics(rhat=pick(finite("rhat"), float),
                            ess=pick(finite("ess"), lambda v: -v),
                            drift=pick(finite("drift"), abs))


def _advice(reports: list[SettingReport]) -> str:
    """What to try next, from what went wrong across the sweep."""
    found = " ".join(problem for r in reports for problem in r.problems)
    advice = []
    if "diverged" in found or "rises" in found or "step-size bias" in found:
        advice.append("smaller step sizes (the loss rises, the chains diverge or the step "
                      "is large against gamma)")
    if "falls" in found or "LLC" in found:
        advice.append("a larger gamma or a longer burn-in (the chains find lower loss "
                      "than w*: a checkpoint away from a minimum)")
    if "disagree" in found:
        advice.append("more draws per setting, or larger step sizes (the chains do not "
                      "agree within the sweep's draws: they mix too slowly for its length)")
    return "Try " + "; or ".join(advice) + "." if advice else ""


def _recommend(reports: list[SettingReport], base: SGLDConfig) -> Calibration:
    stationary = [r for r in reports if r.stationary and np.isfinite(r.ess)]
    if not stationary:
        reasons = "; ".join(f"eps={r.step_size:g}, n_beta={r.n_beta:g}, gamma={r.gamma:g}: "
                            f"{r.problems[0]}" for r in reports)
        return Calibration(reports, None, "No setting of the sweep is stationary (" + reasons
                           + "). " + _advice(reports))
    best = max(stationary, key=lambda r: (r.ess, -reports.index(r)))
    rejected = len(reports) - len(stationary)
    reason = (f"step_size={best.step_size:g}, n_beta={best.n_beta:g}, gamma={best.gamma:g}: "
              f"stationary traces (worst drift {best.drift:+.1f} SE, worst R-hat "
              f"{best.rhat:.2f}, LLC {best.llc:.3g}) and the largest effective sample size "
              f"of the {len(stationary)} stationary settings ({best.ess:.0f} in its worst "
              f"chain group); {rejected} of {len(reports)} settings were not stationary.")
    burnin = max(base.num_burnin, best.burnin)
    reason += f" Burn-in {burnin} steps: the chains reach their level after {best.burnin}."
    return Calibration(reports, base.replace(step_size=best.step_size, n_beta=best.n_beta,
                                             gamma=best.gamma, num_burnin=burnin), reason)
