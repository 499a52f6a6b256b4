"""Glue for transformers, Accelerate and DeepSpeed. ``install()`` runs at ``import hf_adamp``.

Importing this package does not import transformers, Accelerate or DeepSpeed: the patches are applied
when those modules load (or at once if they already have).
"""

from . import deepspeed, transformers
from .deepspeed import DeepSpeedConfigError, ShardingNotSupportedError, ensure_sharding_supported
from .transformers import OPTIM_NAMES, create_optimizer, parse_optim_args, trainer_param_groups


def install() -> None:
    """Register optim="adamp"|"sgdp"|"radam" and the DeepSpeed checks. Safe to call again."""
    transformers.install()
    deepspeed.install()


__all__ = [
    "OPTIM_NAMES",
    "DeepSpeedConfigError",
    "ShardingNotSupportedError",
    "create_optimizer",
    "ensure_sharding_supported",
    "install",
    "parse_optim_args",
    "trainer_param_groups",
]
