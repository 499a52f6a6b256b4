"""The records one step passes from the engine to the backends: tensors (``Item``), per-step scalars, the
decision for pass 2, the environment switches, and the per-parameter memory of past projections.

Backends import this module, never the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..kernels.tables import SCALAR_COLUMNS
from ..sharding.layout import ParamSpec, Segment, merge_runs

# The outcomes of a parameter's last two steps, ``last + 3 * the one before`` (projection.NONE / CHANNEL / LAYER),
# one entry per parameter slot whose rows the local tensor holds, in memory order. A list of ints where the step
# runs on the CPU; on accelerators a device tensor (int64) of the same entries, so that no step reads the device.
MEMORY_KEY = "last_projection"
SPECULATE_ENV = "HF_ADAMP_SPECULATE"
TRITON_ON_CPU_ENV = "HF_ADAMP_TRITON_ON_CPU"  # tests: with TRITON_INTERPRET=1, CPU tensors take the Triton kernels
TRITON_OPT_IN_ENV = "HF_ADAMP_TRITON"  # CUDA tensors take the Triton kernels (fused=None)


@dataclass
class Item:
    """One local tensor taking part in a step, with what both passes of the step need."""

    param: Tensor
    grad: Tensor
    state: Any  # the parameter's state dict (a LocalState view for a DTensor)
    group: dict[str, Any]
    segments: list[Segment]
    specs: list[ParamSpec] = field(default_factory=list)  # the step's parameter slots (full shapes)
    target: Tensor | None = None  # the strided parameter that ``param`` is a dense working copy of
    slots: tuple[int, ...] = ()  # the parameter slots with rows in this tensor, in memory order
    scalars: Any = None  # this step's AdamScalars / SgdScalars, set by the engine before pass 1
    extra: dict[str, Any] = field(default_factory=dict)  # within a step: a backend's own (the reference's update)


@dataclass(frozen=True)
class AdamScalars:
    """AdamP's numbers for the tensors of one group at one step count (computed once per group and count)."""

    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    sqrt_bc2: float  # sqrt(1 - beta2^step)
    step_size: float  # lr / (1 - beta1^step)
    weight_decay: float
    decay: float  # weight multiplier when not projected: 1 - lr * weight_decay
    projected_decay: float  # when projected: 1 - lr * weight_decay * wd_ratio
    nesterov: bool
    maximize: bool

    def kernel_row(self, decay: float) -> list[float]:
        """The C++ kernels' scalar row (``kernels.tables``), applying ``decay`` in pass 1. The kernels divide by
        sqrt(v) + eps * sqrt_bc2 and step by lr / bc1 * sqrt_bc2."""
        values = dict(
            beta1=self.beta1,
            beta2=self.beta2,
            eps_scaled=self.eps * self.sqrt_bc2,
            step_scaled=self.step_size * self.sqrt_bc2,
            decay=decay,
            eps=self.eps,
            nesterov=float(self.nesterov),
            maximize=float(self.maximize),
        )
        return [values[name] for name in SCALAR_COLUMNS["adam"]]


@dataclass(frozen=True)
class SgdScalars:
    """SGDP's numbers for the tensors of one group (no step count: SGDP's step does not depend on it)."""

    step: int
    lr: float
    momentum: float
    dampening: float
    eps: float
    weight_decay: float
    decay: float  # 1 - lr * weight_decay / (1 - momentum)
    projected_decay: float  # the same times wd_ratio
    nesterov: bool
    maximize: bool

    def kernel_row(self, decay: float) -> list[float]:
        values = dict(
            momentum=self.momentum,
            dampening=self.dampening,
            lr=self.lr,
            decay=decay,
            eps=self.eps,
            nesterov=float(self.nesterov),
            maximize=float(self.maximize),
        )
        return [values[name] for name in SCALAR_COLUMNS["sgd"]]


@dataclass
class Decided:
    """What pass 2 needs of the decision: per statistics row the coefficient (per state dtype), per slot the weight
    multiplier and the outcome (projection.NONE / CHANNEL / LAYER)."""

    coef: dict[torch.dtype, Tensor]
    decay: Tensor
    kind: Tensor
    _kinds: list[int] | None = None

    def kinds(self) -> list[int]:
        """The outcomes as host ints (a sync on accelerators: only host-side backends ask)."""
        if self._kinds is None:
            self._kinds = self.kind.tolist()
        return self._kinds


def _on(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Switches:
    """The environment's say in a step, read once per step (reading the environment per tensor would cost more
    than a small tensor's step). A step context is only reused under the same switches."""

    kernels_disabled: bool  # HF_ADAMP_DISABLE_FUSED: no hf_adamp kernels (C++ or Triton)
    cpu_kernels: bool  # the C++ kernels are built and loaded (False when disabled)
    triton_opt_in: bool  # HF_ADAMP_TRITON=1
    triton_on_cpu: bool  # HF_ADAMP_TRITON_ON_CPU=1 and TRITON_INTERPRET=1 (tests)
    speculate: bool  # HF_ADAMP_SPECULATE (default on)

    @staticmethod
    def read(kernels_disabled: bool, cpu_kernels: bool) -> Switches:
        return Switches(
            kernels_disabled=kernels_disabled,
            cpu_kernels=cpu_kernels,
            triton_opt_in=os.environ.get(TRITON_OPT_IN_ENV) == "1",
            triton_on_cpu=os.environ.get(TRITON_ON_CPU_ENV) == "1" and os.environ.get("TRITON_INTERPRET") == "1",
            speculate=_on(SPECULATE_ENV, "1"),
        )


def memory_of(item: Item) -> list[int] | None:
    """The tensor's memory of past outcomes as host ints, one per slot of ``item.slots`` (None: none usable).

    Checkpoints written before this form hold one entry per run of the C++ kernels (runs: ``merge_runs`` of the
    tensor's segments, element-wise runs included); every run of a slot holds the slot's outcome, so the first
    one is taken.
    """
    memory = item.state.get(MEMORY_KEY)
    if memory is None:
        return None
    if isinstance(memory, Tensor):
        memory = memory.tolist()
    if not isinstance(memory, list):
        return None
    if len(memory) == len(item.slots):
        return memory
    runs = merge_runs(item.segments)
    if len(runs) != len(memory):
        return None
    first: dict[int, int] = {}
    for run, value in zip(runs, memory):
        if run.slot >= 0:
            first.setdefault(run.slot, int(value))
    return [first[s] for s in item.slots] if set(first) == set(item.slots) else None
