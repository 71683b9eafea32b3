"""Per-token susceptibilities of model components, estimated with weight-restricted SGLD."""

from typing import TYPE_CHECKING

from susc_callback.analysis.pca import SusceptibilityPCA, align_loadings, standardize
from susc_callback.analysis.series import SnapshotSeries
from susc_callback.callback.schedule import Schedule
from susc_callback.components.architectures import head_components, layer_components
from susc_callback.components.component import Component
from susc_callback.config import SGLDConfig
from susc_callback.data.probes import ProbeSet
from susc_callback.estimator.engine import ChainDivergedError, estimate_susceptibilities
from susc_callback.estimator.results import SusceptibilityResult
from susc_callback.store.files import ResultFileError

if TYPE_CHECKING:
    from susc_callback.callback.trainer_callback import SusceptibilityCallback

__all__ = [
    "ChainDivergedError",
    "Component",
    "ProbeSet",
    "ResultFileError",
    "SGLDConfig",
    "Schedule",
    "SnapshotSeries",
    "SusceptibilityCallback",
    "SusceptibilityPCA",
    "SusceptibilityResult",
    "align_loadings",
    "estimate_susceptibilities",
    "head_components",
    "layer_components",
    "standardize",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The callback imports transformers' Trainer (seconds); the engine API does not need it.
    if name == "SusceptibilityCallback":
        from susc_callback.callback.trainer_callback import SusceptibilityCallback
        return SusceptibilityCallback
    raise AttributeError(f"module 'susc_callback' has no attribute {name!r}")
