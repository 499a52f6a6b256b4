"""Weight norm from Trainer scripts: command-line arguments, and no weight decay on the gains g."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from torch import nn

from .core import WeightNormSummary, apply_weight_norm, weight_norm_gain_names


@dataclass
class WeightNormArguments:
    """Arguments for ``HfArgumentParser`` next to ``TrainingArguments``: ``--weight_norm`` turns it on.

    Example::

        parser = HfArgumentParser((ModelArguments, TrainingArguments, WeightNormArguments))
        model_args, training_args, wn_args = parser.parse_args_into_dataclasses()
        model = ...
        wn_args.apply(model)  # before Trainer(...)
    """

    weight_norm: bool = field(
        default=False, metadata={"help": "Weight-normalise the attention and MLP projections (hf_adamp)."}
    )
    weight_norm_include: list[str] | None = field(
        default=None, metadata={"help": "Module-name regexes to wrap instead of the family rule."}
    )
    weight_norm_exclude: list[str] | None = field(
        default=None, metadata={"help": "Module-name regexes to leave unwrapped."}
    )
    weight_norm_family: str | None = field(
        default=None, metadata={"help": "Family rule to use (default: config.model_type)."}
    )
    weight_norm_conv1d_layout: str = field(
        default="out_in",
        metadata={
            "help": "GPT-2 Conv1D: store v as [out, in] (AdamP channel view) or [in, out].",
            "choices": ["out_in", "in_out"],
        },
    )

    def apply(self, model: nn.Module) -> WeightNormSummary | None:
        """Wrap ``model`` when ``--weight_norm`` was given; returns the summary, or None when off."""
        if not self.weight_norm:
            return None
        return apply_weight_norm(
            model,
            include=self.weight_norm_include,
            exclude=self.weight_norm_exclude,
            family=self.weight_norm_family,
            conv1d_layout=self.weight_norm_conv1d_layout,
        )


_MARK = "_hf_adamp_excludes_weight_norm_gains"


def install_trainer_gain_filter() -> None:
    """Make ``Trainer.get_decay_parameter_names`` leave out weight-norm gains (idempotent).

    Trainer's default filter (bias and norm names, LayerNorm modules) does not match ``...original0``,
    so without this g would be decayed towards 0. Models without weight norm are unaffected.
    """
    from transformers import Trainer

    original = Trainer.get_decay_parameter_names
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        gains = weight_norm_gain_names(model)
        return [name for name in original(self, model) if name not in gains]

    setattr(get_decay_parameter_names, _MARK, True)
    Trainer.get_decay_parameter_names = get_decay_parameter_names
