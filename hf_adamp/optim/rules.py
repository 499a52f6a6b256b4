"""What distinguishes AdamP from SGDP outside the backends' maths: the state, the step count, the per-step scalars
and the weight-decay multipliers. The engine asks its optimizer's rule once per group and step count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._tensors import state_dtype
from ._step import AdamScalars, SgdScalars
from ._validation import lr_of


class AdamRule:
    kernels = "adam"  # the C++ / Triton kernel family
    state_keys = ("exp_avg", "exp_avg_sq")  # the state tensors the kernels update, in the kernels' order
    counts_steps = True

    @staticmethod
    def init_state(param: Tensor, state: dict[str, Any]) -> None:
        dt = state_dtype(param)
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, dtype=dt, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=dt, memory_format=torch.preserve_format)

    @staticmethod
    def advance(state: Any) -> int:
        state["step"] = step = int(state["step"]) + 1
        return step

    @staticmethod
    def decays(group: dict[str, Any]) -> tuple[float, float]:
        """Weight multipliers of the decay: (not projected, projected)."""
        lr_wd = lr_of(group) * group["weight_decay"]
        return 1.0 - lr_wd, 1.0 - lr_wd * group["wd_ratio"]

    @staticmethod
    def scalars(group: dict[str, Any], step: int, decays: tuple[float, float]) -> AdamScalars:
        beta1, beta2 = group["betas"]
        lr = lr_of(group)
        return AdamScalars(
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            sqrt_bc2=math.sqrt(1.0 - beta2**step),
            step_size=lr / (1.0 - beta1**step),
            weight_decay=group["weight_decay"],
            decay=decays[0],
            projected_decay=decays[1],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )


class SgdRule:
    kernels = "sgd"
    state_keys = ("momentum",)
    counts_steps = False

    @staticmethod
    def init_state(param: Tensor, state: dict[str, Any]) -> None:
        state["momentum"] = torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)

    @staticmethod
    def advance(state: Any) -> int:
        return 0

    @staticmethod
    def decays(group: dict[str, Any]) -> tuple[float, float]:
        scaled = lr_of(group) * group["weight_decay"] / (1 - group["momentum"])
        return 1.0 - scaled, 1.0 - scaled * group["wd_ratio"]

    @staticmethod
    def scalars(group: dict[str, Any], step: int, decays: tuple[float, float]) -> SgdScalars:
        return SgdScalars(
            step=step,
            lr=lr_of(group),
            momentum=group["momentum"],
            dampening=group["dampening"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decay=decays[0],
            projected_decay=decays[1],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )


Rule = AdamRule | SgdRule
