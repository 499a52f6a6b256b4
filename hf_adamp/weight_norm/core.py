"""Apply and remove weight normalisation on the projections of Transformer blocks.

Layout (what AdamP optimises, and how it lines up with AdamP's channel view, rows = dim 0 of the parameter):
- ``nn.Linear`` weight [out, in]: ``torch.nn.utils.parametrizations.weight_norm(dim=0)``; v = ``original1`` is
  [out, in], g = ``original0`` is [out, 1]. Each row of v is one output unit, scale-invariant: the channel view.
- GPT-2 ``Conv1D`` weight [in, out]: the per-output-unit norm is over dim 1. With torch's parametrization
  (``conv1d_layout="in_out"``) v stays [in, out], AdamP's rows are input units, the channel test fails and
  AdamP falls back to the layer view. The default ``conv1d_layout="out_in"`` stores v transposed, [out, in],
  with the same norm, so each row of v is again one output unit and AdamP takes the channel view.
The names ``<module>.parametrizations.weight.original0/1`` are torch's in both layouts.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm  # torch's own weight-norm parametrization class
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

from .rules import model_family, rule_for

logger = logging.getLogger(__name__)

Conv1DLayout = Literal["out_in", "in_out"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``, recognised without importing transformers: a model holding one has
    imported it already, and ``import hf_adamp`` stays free of transformers."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


_GAIN = "parametrizations.weight.original0"
_DIRECTION = "parametrizations.weight.original1"
# Written next to the plain weights by save_pretrained: g and v as they are, for an exact resume.
WEIGHT_NORM_STATE_NAME = "weight_norm_state.safetensors"


class TransposedWeightNorm(nn.Module):
    """Weight norm of a Conv1D weight [in, out] whose direction v is stored as [out, in].

    w = (g * v / |v|_row).T, g: [out, 1]. Same maths as torch's weight norm with dim=1 on the
    untransposed weight; only the storage of v changes, so that AdamP's rows are output units.
    """

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return torch._weight_norm(weight_v, weight_g, 0).t()

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        weight_v = weight.t().contiguous()
        return torch.norm_except_dim(weight_v, 2, 0), weight_v


@dataclass
class WeightNormSummary:
    """What ``apply_weight_norm`` did: wrapped module name -> layout, candidate name -> reason skipped."""

    family: str | None
    wrapped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.format()

    def format(self, max_lines: int | None = None) -> str:
        """The summary; with ``max_lines``, each of the wrapped and skipped lists is cut to that many lines."""
        lines = [f"weight norm ({self.family or 'custom rule'}): {len(self.wrapped)} modules wrapped"]
        for verb, entries, brackets in (("wrapped", self.wrapped, "[]"), ("skipped", self.skipped, "()")):
            shown = list(entries.items())[:max_lines]
            lines += [f"  {verb}  {name}  {brackets[0]}{note}{brackets[1]}" for name, note in shown]
            if len(shown) < len(entries):
                lines.append(f"  ... and {len(entries) - len(shown)} more {verb}")
        return "\n".join(lines)


def is_weight_normed(module: nn.Module) -> bool:
    """True when ``module.weight`` carries exactly one weight-norm parametrization (torch's or the Conv1D one)."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    plist = module.parametrizations["weight"]
    return len(plist) == 1 and isinstance(plist[0], (_WeightNorm, TransposedWeightNorm))


def weight_normed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every weight-normalised module of ``model``, in module order."""
    for name, module in model.named_modules():
        if is_weight_normed(module):
            yield name, module


def weight_norm_gain_names(model: nn.Module) -> set[str]:
    """Parameter names of the gains g (``...parametrizations.weight.original0``): they take no weight decay."""
    return {_join(name, _GAIN) for name, _ in weight_normed_modules(model)}


def _as_patterns(patterns: str | Iterable[str] | None) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        return [re.compile(p) for p in patterns]
    except re.error as err:
        raise ValueError(f"Invalid module-name pattern: {err}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def _skip_reason(model: nn.Module, module: nn.Module, shared: set[int]) -> str | None:
    heads = [getattr(model, "get_output_embeddings", lambda: None)()]
    if any(module is head for head in heads if head is not None):
        return "LM head"
    if parametrize.is_parametrized(module, "weight"):
        return "already parametrized" if not is_weight_normed(module) else "already weight-normalised"
    weight = module.weight
    if id(weight) in shared:
        return "tied weight"
    if weight.is_meta:
        return "meta tensor (no data to normalise)"
    return None


def apply_weight_norm(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    family: str | None = None,
    conv1d_layout: Conv1DLayout = "out_in",
) -> WeightNormSummary:
    """Weight-normalise the attention and MLP projections of ``model``'s Transformer blocks, in place.

    Args:
        model: a transformers model (or any module, with ``family`` or ``include``).
        include: regular expressions searched in module names. When given, they replace the family rule:
            every ``nn.Linear``/``Conv1D`` whose name matches one is a candidate.
        exclude: regular expressions; matching candidates are left alone.
        family: the rule to use (default ``model.config.model_type``), see ``rules.FAMILY_RULES``.
        conv1d_layout: how v of a GPT-2 ``Conv1D`` is stored: ``"out_in"`` (rows are output units, AdamP's
            channel view) or ``"in_out"`` (torch's ``weight_norm(dim=1)``, AdamP falls back to its layer view).

    The LM head, tied weights, embeddings and norms are never wrapped. Outputs are unchanged up to
    rounding. Returns a summary (also logged at INFO); ``model.save_pretrained`` writes plain weights.
    Call it before ``deepspeed.initialize`` / ``fully_shard``. A model built under DeepSpeed's ``zero.Init``
    (ZeRO-3) is wrapped one module at a time from its gathered weights, on every rank together, and g and v
    are partitioned as the weights were.
    """
    if conv1d_layout not in ("out_in", "in_out"):
        raise ValueError(f"conv1d_layout must be 'out_in' or 'in_out', got {conv1d_layout!r}")
    include_patterns, exclude_patterns = _as_patterns(include), _as_patterns(exclude)
    family = family or model_family(model)
    if include_patterns:
        selects = lambda name: any(p.search(name) for p in include_patterns)
    elif family is None:
        raise ValueError("apply_weight_norm: the model has no config.model_type; pass family= or include=")
    else:
        selects = rule_for(family).matches

    summary = WeightNormSummary(family=None if include_patterns else family)
    shared = _shared_parameter_ids(model)
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or not selects(name):
            continue
        if any(p.search(name) for p in exclude_patterns):
            summary.skipped[name] = "excluded by pattern"
            continue
        reason = _skip_reason(model, module, shared)
        if reason is not None:
            summary.skipped[name] = reason
            continue
        summary.wrapped[name] = _wrap(module, conv1d_layout)

    if not summary.wrapped:
        raise ValueError(f"apply_weight_norm found nothing to wrap.\n{summary}")
    _install_plain_save(model)
    logger.info("%s", summary)
    return summary


def _wrap(module: nn.Module, conv1d_layout: Conv1DLayout) -> str:
    weight = module.weight
    if not hasattr(weight, "ds_id"):
        return _wrap_full(module, conv1d_layout)
    # DeepSpeed ZeRO-3 (a model built under zero.Init): this rank holds a slice of the weight, so g and v computed
    # from it would be garbage (DeepSpeed issue #1045). Gather the whole weight, wrap, and partition g and v
    # like the weight, before its full copy is released: every rank computes the same g and v.
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        layout = _wrap_full(module, conv1d_layout)
        wrapped = module.parametrizations["weight"]
        weight.convert_to_zero_parameters(param_list=[wrapped.original0, wrapped.original1])
    return f"{layout}; ZeRO-3: gathered, wrapped, re-partitioned"


def _wrap_full(module: nn.Module, conv1d_layout: Conv1DLayout) -> str:
    if is_conv1d(module):
        if conv1d_layout == "out_in":
            parametrize.register_parametrization(module, "weight", TransposedWeightNorm())
            layout = "Conv1D, v [out, in], norm per row"
        else:
            torch_weight_norm(module, "weight", dim=1)
            layout = "Conv1D, v [in, out], norm per column"
    else:
        torch_weight_norm(module, "weight", dim=0)
        layout = "Linear, v [out, in], norm per row"
    module.register_load_state_dict_pre_hook(_accept_plain_weight)
    return layout


def _accept_plain_weight(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Let a wrapped module load a plain checkpoint (``<prefix>weight``): turn it into g and v."""
    plain, gain = prefix + "weight", prefix + _GAIN
    if plain not in state_dict or gain in state_dict or not is_weight_normed(module):
        return
    weight_g, weight_v = module.parametrizations["weight"][0].right_inverse(state_dict.pop(plain))
    state_dict[gain], state_dict[prefix + _DIRECTION] = weight_g, weight_v


def weight_norm_state_dict(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A plain copy of ``state_dict`` (default ``model.state_dict()``): g and v of each weight-normalised
    module folded into ``<module>.weight``, the key a model without weight norm has. Other entries are kept.

    DTensor entries (FSDP2) are gathered with ``full_tensor()``, a collective: call it on every rank.
    """
    if state_dict is None:
        state_dict = model.state_dict()
    folded: dict[str, Tensor] = {}
    targets = {}
    for name, module in weight_normed_modules(model):
        targets[_join(name, _GAIN)] = (name, module)
    skip = {_join(name, _DIRECTION) for name, _ in targets.values()}
    for key, value in state_dict.items():
        if key in skip:
            continue
        if key not in targets:
            folded[key] = value
            continue
        name, module = targets[key]
        direction = _join(name, _DIRECTION)
        if direction not in state_dict:
            raise KeyError(f"weight_norm_state_dict: {key} is in the state dict but {direction} is not")
        with torch.no_grad():
            weight = module.parametrizations["weight"][0](_full(value), _full(state_dict[direction]))
        folded[_join(name, "weight")] = weight.detach().contiguous()
    return folded


def _full(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _install_plain_save(model: nn.Module) -> None:
    """Make this model's ``save_pretrained`` (used by Trainer checkpoints too) write folded, plain weights."""
    if not hasattr(type(model), "save_pretrained") or "save_pretrained" in vars(model):
        return
    model.save_pretrained = types.MethodType(_save_pretrained_plain, model)


def _save_pretrained_plain(self: nn.Module, save_directory, *args, state_dict: dict | None = None, **kwargs):
    """``save_pretrained`` of a weight-normalised model: ``model.safetensors`` gets the folded, plain weights
    (``weight_norm_state_dict``); ``weight_norm_state.safetensors`` keeps g and v for an exact resume."""
    if state_dict is None:
        state_dict = self.state_dict()
    plain = weight_norm_state_dict(self, state_dict)
    result = type(self).save_pretrained(self, save_directory, *args, state_dict=plain, **kwargs)
    if args[0] if args else kwargs.get("is_main_process", True):  # save_pretrained(dir, is_main_process, ...)
        wn_keys = {_join(n, k) for n, _ in weight_normed_modules(self) for k in (_GAIN, _DIRECTION)}
        wn_state = {k: _full(v).detach().cpu().contiguous() for k, v in state_dict.items() if k in wn_keys}
        safetensors.torch.save_file(wn_state, os.path.join(save_directory, WEIGHT_NORM_STATE_NAME))
    return result


def load_weight_norm_state(model: nn.Module, checkpoint_dir: str | os.PathLike) -> bool:
    """Restore g and v exactly from ``<checkpoint_dir>/weight_norm_state.safetensors`` into the wrapped
    ``model`` (in place). Returns False when the file is absent.

    Loading the plain ``weight`` alone gives the same weights but resets |v| to g and makes g positive,
    which changes AdamP's effective step on v and breaks the optimizer state: Trainer resumes call this.
    """
    path = os.path.join(checkpoint_dir, WEIGHT_NORM_STATE_NAME)
    if not os.path.isfile(path):
        return False
    saved = safetensors.torch.load_file(path)
    params = dict(model.named_parameters())
    wanted = {_join(n, k) for n, _ in weight_normed_modules(model) for k in (_GAIN, _DIRECTION)}
    if set(saved) != wanted:
        raise KeyError(
            f"{path} does not match the model's weight norm: missing {sorted(wanted - set(saved))[:4]}, "
            f"unexpected {sorted(set(saved) - wanted)[:4]}"
        )
    with torch.no_grad():
        for key, tensor in saved.items():
            params[key].copy_(tensor)
    return True


def remove_weight_norm(model: nn.Module) -> list[str]:
    """Fold every weight-normalised module of ``model`` back into a plain weight, in place.

    Returns the names of the modules folded. Afterwards the model is an ordinary transformers model.
    """
    folded = []
    for name, module in list(weight_normed_modules(model)):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        if is_conv1d(module):  # the Conv1D layout leaves a transposed (strided) view behind
            module.weight = nn.Parameter(module.weight.detach().contiguous(), module.weight.requires_grad)
        folded.append(name)
    if not folded:
        raise ValueError("remove_weight_norm: the model has no weight-normalised module")
    vars(model).pop("save_pretrained", None)
    return folded
