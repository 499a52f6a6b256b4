"""hf-adamp: AdamP, SGDP and RAdam for transformers, accelerate and deepspeed."""

from .optim import SGDP, AdamP, RAdam
from .telemetry import ProjectionLoggingCallback, add_projection_logging, projection_metrics, scale_invariant_metrics

__version__ = "0.1.0"

__all__ = [
    "AdamP",
    "SGDP",
    "RAdam",
    "ProjectionLoggingCallback",
    "add_projection_logging",
    "projection_metrics",
    "scale_invariant_metrics",
    "__version__",
]
