"""Weight normalisation of Transformer projections (the AdamP paper's WikiText-103 + WN setting).

Importing this package makes Trainer leave weight-norm gains out of weight decay.
"""

from .core import (
    TransposedWeightNorm,
    WeightNormSummary,
    apply_weight_norm,
    is_weight_normed,
    remove_weight_norm,
    weight_norm_gain_names,
    weight_norm_state_dict,
    weight_normed_modules,
)
from .rules import FAMILY_RULES, FamilyRule
from .trainer import WeightNormArguments, install_trainer_gain_filter

install_trainer_gain_filter()

__all__ = [
    "FAMILY_RULES",
    "FamilyRule",
    "TransposedWeightNorm",
    "WeightNormArguments",
    "WeightNormSummary",
    "apply_weight_norm",
    "install_trainer_gain_filter",
    "is_weight_normed",
    "remove_weight_norm",
    "weight_norm_gain_names",
    "weight_norm_state_dict",
    "weight_normed_modules",
]
