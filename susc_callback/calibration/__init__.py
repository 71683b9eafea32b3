"""Choosing the SGLD step size, n_beta and gamma at one checkpoint: a short sweep whose
chain diagnostics recommend a setting (:func:`calibrate`)."""

from susc_callback.calibration.sweep import Calibration, SettingReport, calibrate

__all__ = ["Calibration", "SettingReport", "calibrate"]
