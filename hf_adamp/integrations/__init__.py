"""Glue for transformers, Accelerate and DeepSpeed. ``install()`` runs at ``import hf_adamp``.

Importing this package does not import transformers, Accelerate or DeepSpeed: the patches are applied
when those modules load (or at once if they already have).
"""

from ..sharding.fsdp1 import track_fsdp1_units
from . import deepspeed, transformers
from ._post_import import when_imported
from .deepspeed import DeepSpeedConfigError, ShardingNotSupportedError, attach_sharding
from .transformers import OPTIM_NAMES, create_optimizer, parse_optim_args, trainer_param_groups


def install() -> None:
    """Register optim="adamp"|"sgdp"|"radam", the DeepSpeed checks and the FSDP1 model tracking. Safe to call
    again."""
    transformers.install()
    deepspeed.install()
    when_imported("torch.distributed.fsdp.fully_sharded_data_parallel", "fsdp1_units", track_fsdp1_units)


__all__ = [
    "OPTIM_NAMES",
    "DeepSpeedConfigError",
    "ShardingNotSupportedError",
    "attach_sharding",
    "create_optimizer",
    "install",
    "parse_optim_args",
    "trainer_param_groups",
]
