"""Patterning: data weights from the inverse of the susceptibilities, and training with them."""

from susc_callback.patterning.inverse import PatterningPlan, plan_patterning

__all__ = ["PatterningPlan", "plan_patterning"]
