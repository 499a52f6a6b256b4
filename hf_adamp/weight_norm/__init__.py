"""Weight normalisation of Transformer projections (the AdamP paper's WikiText-103 + WN setting).

Importing this package makes Trainer leave weight-norm gains out of weight decay and resume g, v exactly.
"""

from .core import (
    WEIGHT_NORM_STATE_NAME,
    TransposedWeightNorm,
    WeightNormSummary,
    apply_weight_norm,
    is_weight_normed,
    load_weight_norm_state,
    remove_weight_norm,
    weight_norm_gain_names,
    weight_norm_state_dict,
    weight_normed_modules,
)
from .rules import FAMILY_RULES, FamilyRule
from .trainer import WeightNormArguments, install_trainer_hooks

install_trainer_hooks()

__all__ = [
    "FAMILY_RULES",
    "FamilyRule",
    "TransposedWeightNorm",
    "WeightNormArguments",
    "WEIGHT_NORM_STATE_NAME",
    "WeightNormSummary",
    "apply_weight_norm",
    "load_weight_norm_state",
    "install_trainer_hooks",
    "is_weight_normed",
    "remove_weight_norm",
    "weight_norm_gain_names",
    "weight_norm_state_dict",
    "weight_normed_modules",
]
