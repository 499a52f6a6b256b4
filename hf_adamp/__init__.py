"""hf-adamp: AdamP, SGDP and RAdam for transformers, accelerate and deepspeed."""

from .integrations import create_optimizer
from .integrations import install as _install_integrations
from .optim import SGDP, AdamP, RAdam
from .weight_norm import (
    WeightNormArguments,
    apply_weight_norm,
    remove_weight_norm,
    weight_norm_gain_names,
    weight_norm_state_dict,
)

_install_integrations()  # registers optim="adamp"|"sgdp"|"radam" with transformers (lazily, see integrations)

__version__ = "0.1.0"

# telemetry subclasses transformers' TrainerCallback: import it on first use, not at `import hf_adamp`
_TELEMETRY = ("ProjectionLoggingCallback", "add_projection_logging", "projection_metrics", "scale_invariant_metrics")


def __getattr__(name: str):
    if name in _TELEMETRY:
        from . import telemetry

        return getattr(telemetry, name)
    raise AttributeError(f"module 'hf_adamp' has no attribute {name!r}")


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
