"""The triton backend: the Triton kernels of ``hf_adamp.kernels.triton_step`` (CUDA).

Runs as on the cpu backend: each tensor's segments merged into runs; one pass-1 launch per run (element-wise
runs finish there), one pass-2 launch per projectable run after the decision. Nothing here reads a device value
on the host: the decision's coefficients and decay factors reach pass 2 as device pointers, so a step is free of
host syncs. No speculation on this backend: choosing it needs the previous step's outcome on the host.

Opt-in until a GPU run of ``benchmarks/gpu_check.py`` has passed: CUDA tensors take it with ``fused=True`` or
``HF_ADAMP_TRITON=1``, else the eager backend. triton is imported on first use only, for a CUDA tensor (or, in
tests, a CPU tensor under ``HF_ADAMP_TRITON_ON_CPU=1`` and ``TRITON_INTERPRET=1``, Triton's interpreter); a
CPU-only install never imports it. ``HF_ADAMP_DISABLE_FUSED=1`` turns this backend off too.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
from torch import Tensor

from ..._tensors import flat
from ...kernels import DISABLE_ENV
from ...sharding.layout import Segment, merge_runs
from .._step import TRITON_ON_CPU_ENV, TRITON_OPT_IN_ENV, Decided, Item, Switches
from .base import Backend

logger = logging.getLogger(__name__)

ON_CPU_ENV = TRITON_ON_CPU_ENV
OPT_IN_ENV = TRITON_OPT_IN_ENV  # the kernels have passed the interpreter's tests, not yet a GPU's
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp64 takes the eager backend
_module: ModuleType | None = None
_failed: str | None = None


def forced_on_cpu() -> bool:
    return os.environ.get(ON_CPU_ENV) == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def wanted_on(device: torch.device) -> bool:
    """Whether a tensor on ``device`` takes the Triton kernels by default (``fused=None``): CUDA with the opt-in,
    or a CPU tensor under the interpreter (tests)."""
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
    try:  # deferred: importing triton costs seconds, and only tensors that take this backend need it
        from ...kernels import triton_step
    except Exception as exc:  # no triton, or one that does not load
        _failed = f"{type(exc).__name__}: {exc}"
        logger.warning("hf_adamp: Triton kernels unavailable (%s)", _failed)
        return False
    _module = triton_step
    return True


class _Plan:
    """One tensor's runs (kept per step context) and, within a step, its flat tensors."""

    __slots__ = ("item", "runs", "projectable", "tensors")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.runs: list[Segment] = merge_runs(item.segments)
        self.projectable = [run for run in self.runs if run.slot >= 0]
        self.tensors: list[Tensor] = []


class TritonKernels(Backend):
    name = "triton"

    def refusal(self, item: Item, switches: Switches) -> str | None:
        p = item.param
        if p.device.type != "cuda" and not (p.device.type == "cpu" and switches.triton_on_cpu):
            return f"the Triton kernels step CUDA tensors (got one on {p.device})"
        if switches.kernels_disabled:
            return f"{DISABLE_ENV}=1 is set"
        if p.dtype not in DTYPES or item.grad.dtype != p.dtype:
            return (
                "the Triton kernels take fp32/fp16/bf16 weights with gradients of their dtype "
                f"(got {p.dtype} and {item.grad.dtype})"
            )
        for key in self.rule.state_keys:
            t = item.state[key]
            if t.dtype != torch.float32 or t.device != p.device or t.stride() != p.stride():
                return "the Triton kernels need fp32 state laid out like the weight"
        if not available():
            return f"triton does not load ({_failed})"
        return None

    def prepare(self, items: list[Item]) -> list[_Plan]:
        return [_Plan(item) for item in items]

    def first(self, batch: list[_Plan], stats: Tensor, switches: Switches) -> None:
        launch = getattr(_module, self.rule.kernels + "_first")
        keys = self.rule.state_keys
        for plan in batch:
            item = plan.item
            s = item.scalars
            plan.tensors = tensors = [flat(item.grad), flat(item.param)] + [flat(item.state[k]) for k in keys]
            for run in plan.runs:
                launch(
                    tensors, run.start, run.rows, run.row_len, run.slot < 0, stats, run.stat_row, s,
                    s.nesterov, s.maximize,
                )  # fmt: skip

    def second(self, batch: list[_Plan], decided: Decided) -> None:
        launch = getattr(_module, self.rule.kernels + "_second")
        decay = decided.decay
        for plan in batch:
            if not plan.projectable:
                continue
            s = plan.item.scalars
            coef = decided.coef[plan.tensors[2].dtype]
            for run in plan.projectable:
                launch(
                    plan.tensors, run.start, run.rows, run.row_len, coef, run.stat_row, decay, run.slot, s,
                    s.nesterov, s.maximize,
                )  # fmt: skip

    def release(self, batch: list[_Plan]) -> None:
        for plan in batch:
            plan.tensors = []
