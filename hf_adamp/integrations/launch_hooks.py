"""What ``python -m hf_adamp`` switches on in a script that does not know about hf-adamp.

- Weight norm: the model a ``Trainer`` receives (``model=`` or ``model_init``) and every model passed to
  ``Accelerator.prepare`` is weight-normalised before an optimizer is built for it. An optimizer the script
  built earlier, from the plain weights, gets the new parameters in their place (v where the weight was, the
  gain g in the group without weight decay), as long as it has not stepped yet.
- Projection logging: every ``Trainer`` gets ``ProjectionLoggingCallback`` first in its callbacks.

Nothing happens until ``enable_weight_norm`` / ``enable_projection_logging`` is called (the launcher does).
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..weight_norm.core import _as_patterns, apply_weight_norm, weight_normed_modules
from ._post_import import when_imported
from .deepspeed import innermost_optimizer

_MARK = "_hf_adamp_launch_"
# How many wrapped and skipped module names the printed summary lists (a 32-layer model wraps hundreds).
SUMMARY_LINES = 8


@dataclass(frozen=True)
class WeightNormSettings:
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    family: str | None = None


_weight_norm: WeightNormSettings | None = None
_log_projection = False
# id(plain weight) -> (weight, g, v), weakly: what an optimizer built before the wrap must hold instead
_replaced: dict[int, tuple[weakref.ref, weakref.ref, weakref.ref]] = {}


def enable_weight_norm(include: Any = None, exclude: Any = None, family: str | None = None) -> None:
    """Weight-normalise the models that Trainer and ``Accelerator.prepare`` receive from now on."""
    _as_patterns(include), _as_patterns(exclude)  # a bad regex fails now, not after the data is loaded
    global _weight_norm
    _weight_norm = WeightNormSettings(
        tuple([include] if isinstance(include, str) else include) if include else None,
        tuple([exclude] if isinstance(exclude, str) else exclude) if exclude else None,
        family,
    )
    _install()


def enable_projection_logging() -> None:
    """Add the projection metrics to the logs of every Trainer built from now on."""
    global _log_projection
    _log_projection = True
    _install()


def disable() -> None:
    """Switch both off again (the hooks stay, doing nothing)."""
    global _weight_norm, _log_projection
    _weight_norm, _log_projection = None, False
    _replaced.clear()


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ----- weight norm -----
def weight_norm_model(model: Any) -> None:
    """Apply the enabled weight norm to ``model``, unless it has some already (the script's own, or ours)."""
    if _weight_norm is None or not isinstance(model, nn.Module):
        return
    from transformers.pytorch_utils import Conv1D  # deferred: transformers is the user's import

    if next(weight_normed_modules(model), None) is not None:
        return
    plain = {name: m.weight for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    try:
        summary = apply_weight_norm(
            model, include=_weight_norm.include, exclude=_weight_norm.exclude, family=_weight_norm.family
        )
    except ValueError as err:
        raise ValueError(
            f"hf_adamp --weight-norm: {err}\n(launcher options: --weight-norm-include REGEX, "
            "--weight-norm-exclude REGEX, --weight-norm-family NAME)"
        ) from err
    for name in summary.wrapped:
        weight, wrapped = plain[name], model.get_submodule(name).parametrizations["weight"]
        _replaced[id(weight)] = tuple(weakref.ref(t) for t in (weight, wrapped.original0, wrapped.original1))
    if _is_main_process():
        print(f"hf_adamp: {summary.format(SUMMARY_LINES)}", flush=True)


def _gain_group(groups: list[dict[str, Any]], group: dict[str, Any]) -> dict[str, Any]:
    """Where the gain g of a weight from ``group`` goes: a group without weight decay, as the Trainer does."""
    if not group.get("weight_decay"):
        return group
    return next((g for g in groups if not g.get("weight_decay")), group)


def swap_wrapped_weights(optimizer: Any) -> None:
    """Put g and v in place of the plain weights weight norm replaced, in an optimizer built before the wrap."""
    if not _replaced or not isinstance(optimizer, torch.optim.Optimizer):
        return
    inner = innermost_optimizer(optimizer)
    swapped = False
    for group in inner.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            refs = _replaced.get(id(p))
            if refs is None or refs[0]() is not p:
                continue
            if inner.state.get(p):
                raise RuntimeError(
                    f"hf_adamp --weight-norm: {type(inner).__name__} has already stepped on a weight that weight "
                    "norm replaced; build (or prepare) the optimizer before its first step"
                )
            gain, direction = refs[1](), refs[2]()
            params[i] = direction
            _gain_group(inner.param_groups, group)["params"].append(gain)
            swapped = True
    if swapped and hasattr(inner, "params_replaced"):
        inner.params_replaced()


# ----- hooks -----
def _unwrapped(method: Any) -> Any:
    while getattr(method, _MARK, False):
        method = method.__wrapped__
    return method


def _patch_trainer(trainer_module: ModuleType) -> None:
    trainer_cls = trainer_module.Trainer
    original_init = _unwrapped(trainer_cls.__init__)
    original_model_init = _unwrapped(trainer_cls.call_model_init)

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        weight_norm_model(kwargs["model"] if "model" in kwargs else (args[0] if args else None))
        original_init(self, *args, **kwargs)
        if _log_projection:
            from ..telemetry import ProjectionLoggingCallback, add_projection_logging

            if not any(isinstance(c, ProjectionLoggingCallback) for c in self.callback_handler.callbacks):
                add_projection_logging(self)

    @functools.wraps(original_model_init)
    def call_model_init(self: Any, *args: Any, **kwargs: Any) -> Any:
        model = original_model_init(self, *args, **kwargs)
        weight_norm_model(model)
        return model

    for name, wrapper in (("__init__", __init__), ("call_model_init", call_model_init)):
        setattr(wrapper, _MARK, True)
        setattr(trainer_cls, name, wrapper)


def _patch_accelerator(accelerator_module: ModuleType) -> None:
    accelerator_cls = accelerator_module.Accelerator
    original = _unwrapped(accelerator_cls.prepare)

    @functools.wraps(original)
    def prepare(self: Any, *args: Any, **kwargs: Any) -> Any:
        for obj in args:
            weight_norm_model(obj)
        for obj in args:
            swap_wrapped_weights(obj)
        return original(self, *args, **kwargs)

    setattr(prepare, _MARK, True)
    accelerator_cls.prepare = prepare


def _install() -> None:
    when_imported("transformers.trainer", "launch_hooks", _patch_trainer)
    when_imported("accelerate.accelerator", "launch_hooks", _patch_accelerator)
