"""hf-adamp: AdamP, SGDP and RAdam for transformers, accelerate and deepspeed."""

from .integrations import create_optimizer
from .integrations import install as _install_integrations
from .optim import SGDP, AdamP, RAdam
from .telemetry import ProjectionLoggingCallback, add_projection_logging, projection_metrics, scale_invariant_metrics

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
    "__version__",
]
