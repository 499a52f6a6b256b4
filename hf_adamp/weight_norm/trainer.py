"""Weight norm from Trainer scripts: command-line arguments, and no weight decay on the gains g."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from torch import nn

from ..integrations._post_import import when_imported
from .core import (
    WeightNormSummary,
    apply_weight_norm,
    load_weight_norm_state,
    weight_norm_gain_names,
    weight_normed_modules,
)


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


_MARK = "_hf_adamp_weight_norm_patch"


def install_trainer_hooks() -> None:
    """Patch ``Trainer`` once (idempotent) for weight-normalised models; others are unaffected.

    - ``get_decay_parameter_names`` leaves out the gains g: Trainer's default filter (bias and norm
      names, LayerNorm modules) does not match ``...original0``, so g would be decayed towards 0.
    - ``_load_from_checkpoint`` (resume) restores g and v exactly from ``weight_norm_state.safetensors``
      after loading the plain weights.
    """

    def patch(trainer_module) -> None:
        _patch_decay_names(trainer_module.Trainer)
        _patch_resume(trainer_module.Trainer)

    # on first import of transformers.trainer (importing it here would cost seconds at `import hf_adamp`)
    when_imported("transformers.trainer", "hf_adamp.weight_norm", patch)


def _patch_decay_names(Trainer: type) -> None:

    original = Trainer.get_decay_parameter_names
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        gains = weight_norm_gain_names(model)
        return [name for name in original(self, model) if name not in gains]

    setattr(get_decay_parameter_names, _MARK, True)
    Trainer.get_decay_parameter_names = get_decay_parameter_names


def _patch_resume(Trainer: type) -> None:
    original = getattr(Trainer, "_load_from_checkpoint", None)
    if original is None or getattr(original, _MARK, False):  # a transformers without it: plain resume only
        return

    @functools.wraps(original)
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        original(self, resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if next(weight_normed_modules(target), None) is not None:
            load_weight_norm_state(target, resume_from_checkpoint)

    setattr(_load_from_checkpoint, _MARK, True)
    Trainer._load_from_checkpoint = _load_from_checkpoint
