"""hf-adamp: AdamP, SGDP and RAdam for transformers, accelerate and deepspeed."""

from .integrations import create_optimizer
from .integrations import install as _install_integrations
from .optim import SGDP, AdamP, RAdam
from .telemetry import ProjectionLoggingCallback, add_projection_logging, projection_metrics, scale_invariant_metrics
from .weight_norm import (
    WeightNormArguments,
    apply_weight_norm,
    remove_weight_norm,
    weight_norm_gain_names,
    weight_norm_state_dict,
)

_install_integrations()  # registers optim="adamp"|"sgdp"|"radam" with transformers (lazily, see integrations)

__version__ = "0.1.0"

__all__ = [
    "AdamP",
    "SGDP",
    "RAdam",
    "create_optimizer",
    "ProjectionLoggingCallback",
    "add_projection_logging",
    "projection_metrics",
    "scale_invariant_metrics",
    "WeightNormArguments",
    "apply_weight_norm",
    "remove_weight_norm",
    "weight_norm_gain_names",
    "weight_norm_state_dict",
    "__version__",
]
