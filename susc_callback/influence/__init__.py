"""The influence matrix (Bayesian influence functions) from the engine's SGLD draws."""

from susc_callback.influence.estimate import estimate_influence
from susc_callback.influence.result import InfluenceResult

__all__ = ["InfluenceResult", "estimate_influence"]
