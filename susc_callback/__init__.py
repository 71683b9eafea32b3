"""Per-token susceptibilities of model components, estimated with weight-restricted SGLD."""

from susc_callback.analysis import SusceptibilityPCA, align_loadings, standardize
from susc_callback.architectures import head_components, layer_components
from susc_callback.components import Component
from susc_callback.config import SGLDConfig
from susc_callback.engine import ChainDivergedError, estimate_susceptibilities
from susc_callback.probes import ProbeSet
from susc_callback.results import SusceptibilityResult

__all__ = [
    "ChainDivergedError",
    "Component",
    "ProbeSet",
    "SGLDConfig",
    "SusceptibilityPCA",
    "SusceptibilityResult",
    "align_loadings",
    "estimate_susceptibilities",
    "head_components",
    "layer_components",
    "standardize",
]
__version__ = "0.1.0"
