"""DeepSpeed through the Trainer and Accelerate: make sure the optimizer that runs is the one asked for.

Three ways a different optimizer could run silently:

* a DeepSpeed config with an "optimizer" section makes the Trainer build DeepSpeed's optimizer and
  ignore ``optim="adamp"`` -> ``check_trainer_deepspeed_config`` raises;
* with ZeRO-Offload and ``zero_force_ds_cpu_optimizer`` left at its default, Accelerate swaps the
  optimizer for ``DeepSpeedCPUAdam`` -> ``check_offload`` raises with the setting to change;
* under ZeRO (and DeepSpeed's flat fp16/bf16 wrappers) AdamP/SGDP are handed 1-D flat partitions and,
  without a sharding layout, would act as AdamW -> ``ensure_sharding_supported`` raises.

The checks hook into ``Accelerator._prepare_deepspeed`` (Trainer and plain Accelerate loops both go
through it) and into transformers' ``deepspeed_optim_sched``. Nothing here imports deepspeed.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import torch

from ..optim import RAdam
from ..optim._engine import ProjectedOptimizer
from ..sharding import attach
from ..sharding.deepspeed import is_zero_optimizer
from ._post_import import when_imported
from .transformers import OPTIMIZER_CLASSES, is_hf_adamp_optim

_MARK = "_hf_adamp_"
_HF_ADAMP_OPTIMIZERS = (ProjectedOptimizer, RAdam)


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config would make a different optimizer run than the one asked for."""


class ShardingNotSupportedError(NotImplementedError):
    """AdamP/SGDP were handed flat partitions with no sharding layout attached."""


def innermost_optimizer(optimizer: Any) -> Any:
    """Follow ``.optimizer`` through Accelerate and DeepSpeed wrappers to the client optimizer."""
    return _wrapper_chain(optimizer)[-1]


def _wrapper_chain(optimizer: Any) -> list[Any]:
    chain = [optimizer]
    while len(chain) < 16:
        inner = getattr(chain[-1], "optimizer", None)
        if inner is None or any(inner is seen for seen in chain) or not hasattr(inner, "param_groups"):
            break
        chain.append(inner)
    return chain


def is_hf_adamp_optimizer(optimizer: Any) -> bool:
    return isinstance(innermost_optimizer(optimizer), _HF_ADAMP_OPTIMIZERS)


# ----- the "optimizer" section -----
def check_trainer_deepspeed_config(optim: Any, ds_config: Mapping[str, Any]) -> None:
    """Refuse ``optim="adamp"|"sgdp"|"radam"`` with a DeepSpeed config that has an "optimizer" section."""
    if not is_hf_adamp_optim(optim) or "optimizer" not in ds_config:
        return
    name = getattr(optim, "value", optim)
    cls_name = OPTIMIZER_CLASSES[name].__name__
    section = ds_config["optimizer"]
    ds_type = section.get("type", "?") if isinstance(section, Mapping) else "?"
    raise DeepSpeedConfigError(
        f'TrainingArguments(optim="{name}") asks for hf_adamp.{cls_name}, but the DeepSpeed config has an '
        f'"optimizer" section (type {ds_type!r}), which makes the Trainer build DeepSpeed\'s optimizer instead. '
        f'Remove the "optimizer" section from the DeepSpeed config to train with {cls_name}, or choose a '
        f'built-in optim to train with DeepSpeed\'s "{ds_type}".'
    )


# ----- ZeRO-Offload -----
def offload_device(ds_config: Mapping[str, Any]) -> str | None:
    zero = ds_config.get("zero_optimization") or {}
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return None if device in (None, "none") else str(device)


def check_offload(ds_config: Mapping[str, Any], optimizers: Iterable[Any]) -> None:
    """Refuse ZeRO-Offload with ``zero_force_ds_cpu_optimizer`` on, where Accelerate would replace our
    optimizer with ``DeepSpeedCPUAdam`` (same condition as Accelerate's own test)."""
    device = offload_device(ds_config)
    if device is None or not ds_config.get("zero_force_ds_cpu_optimizer", True):
        return
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.Optimizer) and is_hf_adamp_optimizer(optimizer):
            name = type(innermost_optimizer(optimizer)).__name__
            raise DeepSpeedConfigError(
                f"DeepSpeed ZeRO-Offload is on (zero_optimization.offload_optimizer.device = {device!r}) and "
                '"zero_force_ds_cpu_optimizer" is not false, so Accelerate would replace hf_adamp.'
                f"{name} with DeepSpeedCPUAdam, a different optimizer. To run {name} with ZeRO-Offload, add "
                '"zero_force_ds_cpu_optimizer": false at the top level of the DeepSpeed config (the step then '
                f'runs {name} on the CPU); or remove "offload_optimizer" from "zero_optimization".'
            )


# ----- ZeRO sharding -----
def _flattening_wrapper(wrapper: Any) -> str | None:
    """The name of a DeepSpeed wrapper that hands the client optimizer flat master weights without
    ZeRO's partition metadata (so no layout can be built), if ``wrapper`` is one."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    if isinstance(wrapper, BF16_Optimizer):
        return "DeepSpeed's bf16 optimizer (used for bf16 with ZeRO stage 0 or 1)"
    if isinstance(wrapper, FP16_Optimizer):
        return "DeepSpeed's fp16 optimizer (flat fp32 master weights, ZeRO stage 0)"
    return None


def attach_sharding(optimizer: Any) -> None:
    """Attach the sharding layout when AdamP/SGDP sit under a DeepSpeed ZeRO optimizer; refuse the flat
    wrappers that have no layout adapter (DeepSpeed's non-ZeRO bf16/fp16 optimizers).

    Without a layout the step would see 1-D flat partitions, skip the projection and act as AdamW.
    """
    chain = _wrapper_chain(optimizer)
    inner = chain[-1]
    if not isinstance(inner, ProjectedOptimizer) or inner._layouts:
        return
    for wrapper in chain[:-1]:
        if is_zero_optimizer(wrapper):
            attach(wrapper, inner)
            return
        engine = _flattening_wrapper(wrapper)
        if engine is not None:
            name = type(inner).__name__
            raise ShardingNotSupportedError(
                f"hf_adamp.{name} under {engine}: DeepSpeed hands the optimizer flat master weights that no "
                f"hf_adamp layout maps to parameter rows, so {name} would silently act as AdamW. Use ZeRO stage "
                "2 or 3 for half precision (mapped exactly), or fp32 with any stage."
            )


# ----- hooks -----
def patch_accelerator(accelerator_module: ModuleType) -> None:
    """Wrap ``Accelerator._prepare_deepspeed``: offload check before, sharding layout after (idempotent)."""
    accelerator_cls = accelerator_module.Accelerator
    original = accelerator_cls.__dict__["_prepare_deepspeed"]
    while getattr(original, _MARK, False):
        original = original.__wrapped__

    @functools.wraps(original)
    def _prepare_deepspeed(self: Any, *args: Any) -> Any:
        plugin = getattr(self.state, "deepspeed_plugin", None)
        if plugin is not None:
            check_offload(plugin.deepspeed_config, args)
        result = original(self, *args)
        for obj in result if isinstance(result, (list, tuple)) else (result,):
            if isinstance(obj, torch.optim.Optimizer):
                attach_sharding(obj)
        return result

    setattr(_prepare_deepspeed, _MARK, True)
    accelerator_cls._prepare_deepspeed = _prepare_deepspeed


def patch_transformers_deepspeed(ds_module: ModuleType) -> None:
    """Wrap transformers' ``deepspeed_optim_sched`` (looked up at call time by ``deepspeed_init``)."""
    original = ds_module.deepspeed_optim_sched
    while getattr(original, _MARK, False):
        original = original.__wrapped__

    @functools.wraps(original)
    def deepspeed_optim_sched(trainer: Any, hf_deepspeed_config: Any, args: Any, *rest: Any, **kwargs: Any) -> Any:
        check_trainer_deepspeed_config(args.optim, hf_deepspeed_config.config)
        return original(trainer, hf_deepspeed_config, args, *rest, **kwargs)

    setattr(deepspeed_optim_sched, _MARK, True)
    ds_module.deepspeed_optim_sched = deepspeed_optim_sched


def install() -> None:
    """Hook the checks into Accelerate and transformers, now or when they load."""
    when_imported("accelerate.accelerator", "prepare_deepspeed", patch_accelerator)
    when_imported("transformers.integrations.deepspeed", "deepspeed_optim_sched", patch_transformers_deepspeed)
