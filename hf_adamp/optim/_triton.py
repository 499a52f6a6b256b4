"""Glue between the phased step and the Triton kernels of ``hf_adamp.kernels.triton_step`` (CUDA).

Runs as on the C++ path (``_fused``): each local tensor's segments merged into runs; one pass-1 launch
per run (element-wise runs finish there), one pass-2 launch per projectable run after the decision. Nothing
here reads a device value on the host: the decision's coefficients and decay factors reach pass 2 as device
pointers, so a step is free of host syncs. No speculation (``HF_ADAMP_SPECULATE``) on this path: choosing it
needs the previous step's outcome on the host.

Opt-in until a GPU run of ``benchmarks/gpu_check.py`` has passed: CUDA tensors take the eager torch path
unless ``HF_ADAMP_TRITON=1``. triton is imported on first use only, for a CUDA tensor (or, in tests, a CPU
tensor under ``HF_ADAMP_TRITON_ON_CPU=1`` and ``TRITON_INTERPRET=1``, Triton's interpreter); a CPU-only
install never imports it. ``HF_ADAMP_DISABLE_FUSED=1`` turns this path off too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..sharding.layout import Segment
from ._base import Item, flat
from ._fused import merge_runs

logger = logging.getLogger(__name__)

ON_CPU_ENV = "HF_ADAMP_TRITON_ON_CPU"
OPT_IN_ENV = "HF_ADAMP_TRITON"  # the kernels have passed the interpreter's tests, not yet a GPU's
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp64 takes the eager path
_module: ModuleType | None = None
_failed: str | None = None


@dataclass
class Plan:
    """The projectable runs of one local tensor, for pass 2."""

    runs: list[Segment]
    tensors: list[Tensor]  # flat grad, param, then the state tensors


def forced_on_cpu() -> bool:
    return os.environ.get(ON_CPU_ENV) == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def wanted_on(device: torch.device) -> bool:
    """Whether a tensor on ``device`` should take the Triton kernels: CUDA with the opt-in, or the interpreter."""
    if device.type == "cuda":
        return os.environ.get(OPT_IN_ENV) == "1"
    return device.type == "cpu" and forced_on_cpu()


def available() -> bool:
    """True when the Triton kernels import; imports triton on the first call."""
    global _module, _failed
    if _module is not None:
        return True
    if _failed is not None:
        return False
    try:
        from ..kernels import triton_step
    except Exception as exc:  # no triton, or one that does not load: the eager path
        _failed = f"{type(exc).__name__}: {exc}"
        logger.warning("hf_adamp: Triton kernels unavailable (%s); using the eager path", _failed)
        return False
    _module = triton_step
    return True


def usable(item: Item, state_keys: tuple[str, ...]) -> bool:
    """The Triton kernels can step this tensor: CUDA (or the test interpreter), fp32/fp16/bf16 weights with
    gradient of the same dtype, fp32 state laid out like the weight."""
    p = item.param
    if not wanted_on(p.device):
        return False  # checked first: tensors that do not want the kernels never get near the triton import
    if kernels.disabled_by_env() or p.dtype not in _DTYPES or item.grad.dtype != p.dtype:
        return False
    for key in state_keys:
        t = item.state[key]
        if t.dtype != torch.float32 or t.device != p.device or t.stride() != p.stride():
            return False
    return available()


def _plan(opt: Any, item: Item, state_keys: tuple[str, ...]) -> tuple[list[Segment], list[Tensor]]:
    segs = item.segments
    # merged runs per tensor, reused while its segments are the same
    cache = opt.__dict__.setdefault("_triton_runs", {})
    cached = cache.get(id(item.param))
    if cached is not None and cached[0] == segs:
        runs = cached[1]
    else:
        runs = merge_runs(segs)
        cache[id(item.param)] = (list(segs), runs)
    tensors = [flat(item.grad), flat(item.param)] + [flat(item.state[k]) for k in state_keys]
    return runs, tensors


def _first(opt: Any, item: Item, stats: Tensor, state_keys: tuple[str, ...], launch) -> None:
    runs, tensors = _plan(opt, item, state_keys)
    group = item.group
    for run in runs:
        launch(
            tensors, run.start, run.rows, run.row_len, run.slot < 0, stats, run.stat_row, item.scalars,
            group["nesterov"], group["maximize"],
        )  # fmt: skip
    projectable = [run for run in runs if run.slot >= 0]
    if projectable:
        item.extra["triton"] = Plan(projectable, tensors)


def _second(item: Item, coef: Tensor, decay: Tensor, launch) -> None:
    plan: Plan = item.extra.pop("triton")
    group = item.group
    for run in plan.runs:
        launch(
            plan.tensors, run.start, run.rows, run.row_len, coef, run.stat_row, decay, run.slot, item.scalars,
            group["nesterov"], group["maximize"],
        )  # fmt: skip


def adam_first(opt: Any, item: Item, stats: Tensor, state_keys: tuple[str, ...]) -> None:
    _first(opt, item, stats, state_keys, _module.adam_first)


def adam_second(item: Item, coef: Tensor, decay: Tensor) -> None:
    _second(item, coef, decay, _module.adam_second)


def sgd_first(opt: Any, item: Item, stats: Tensor, state_keys: tuple[str, ...]) -> None:
    _first(opt, item, stats, state_keys, _module.sgd_first)


def sgd_second(item: Item, coef: Tensor, decay: Tensor) -> None:
    _second(item, coef, decay, _module.sgd_second)
