"""``steps_between_draws="auto"``: how many SGLD steps to take between draws.

A draw evaluates the probe and the observable set (a forward pass over their
sequences); an SGLD step a forward and a backward pass over one minibatch. Consecutive
steps are strongly correlated, so drawing at every step spends most of the work on
nearly repeated draws. With a spacing of ``k`` steps, a draw costs ``k + r`` step
equivalents (``r``: a draw's cost over a step's) and is worth ``1 / tau_k`` independent
draws, ``tau_k = 1 + 2 sum_j rho(j k)`` being the integrated autocorrelation time of the
thinned chain. The spacing with the most independent draws per unit of work,
``1 / (tau_k (k + r))``, is the choice.

``rho`` is measured on a pilot: the full chain alone (usually the slowest to mix: every
direction of weight space is free), ``PILOT_CHAINS`` chains of ``PILOT_DRAWS`` draws at
every step, on the mean probe loss, seeded from the config's seed (the choice is
reproducible). ``r`` comes from counting passes, not from timing (which would make the
estimate depend on the machine): ``(probe sequences + observable sequences) / (3 x
batch_size)``, a backward costing about two forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from susc_callback.config import SGLDConfig
from susc_callback.estimator.autocorrelation import autocorrelation, integrated_time

PILOT_CHAINS, PILOT_DRAWS = 2, 64
MAX_SPACING = 32


@dataclass(frozen=True)
class DrawSpacing:
    """The chosen spacing and what it rests on: ``autocorrelation`` of the pilot's trace
    at lags ``0..``, the draw-to-step ``cost_ratio``, and ``rates``, independent draws per
    step equivalent for every candidate spacing ``1..``."""

    steps_between_draws: int
    autocorrelation: np.ndarray
    cost_ratio: float
    rates: np.ndarray

    def to_dict(self) -> dict:
        return {"steps_between_draws": self.steps_between_draws,
                "cost_ratio": round(self.cost_ratio, 4),
                "autocorrelation": np.round(self.autocorrelation, 4).tolist(),
                "gain_over_every_step": round(float(self.rates.max() / self.rates[0]), 3)}


def pilot_config(config: SGLDConfig) -> SGLDConfig:
    """The pilot: the config's sampler at every step, a few chains, its own seed."""
    return config.replace(steps_between_draws=1, num_chains=PILOT_CHAINS,
                          num_draws=PILOT_DRAWS, seed=config.seed + 1, progress=False)


def cost_ratio(config: SGLDConfig, probe_sequences: int) -> float:
    """A draw's work over an SGLD step's, in forward passes over one sequence."""
    observable = 0 if config.observable == "minibatch" else config.observable_sequences
    return (probe_sequences + observable) / (3 * config.batch_size)


def choose_spacing(traces: np.ndarray, ratio: float) -> DrawSpacing:
    """The spacing from pilot traces ``(chains, draws)`` drawn at every step."""
    traces = traces[np.isfinite(traces).all(axis=1)]
    rho = autocorrelation(traces, max_lag=traces.shape[1] // 2)
    if rho is None:  # a constant trace: every draw the same, nothing to space
        rho = np.eye(1, traces.shape[1] // 2 + 1).ravel()
    spacings = np.arange(1, MAX_SPACING + 1)
    rates = np.array([1 / (integrated_time(rho[::k]) * (k + ratio)) for k in spacings])
    return DrawSpacing(int(spacings[np.argmax(rates)]), rho, ratio, rates)
