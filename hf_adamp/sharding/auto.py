"""Attach a layout without user ceremony, on the first step() that meets engine-replaced tensors.

- FSDP2: the DTensor parameters carry their own sharding, so the layout is built from them alone.
- DeepSpeed ZeRO: the ZeRO optimizer calls our ``step()`` from its ``_optimizer_step``; the caller's frame
  holds it, and with it the partitions' metadata.
- FSDP1: the FSDP modules built since ``import hf_adamp`` are known; the one holding the optimizer's flat
  parameters (or their original parameters) gives the layout.
- DeepSpeed stage 0 with fp16/bf16 (``FP16_UnfusedOptimizer``): it hands us full-shape fp32 copies of the
  parameters; they need no layout, only to be taken as the user's tensors.
Anything else is left alone: the optimizer then raises its clear "no sharding layout" error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .deepspeed import attach_deepspeed, full_copies_of, holds_full_copies, is_zero_optimizer
from .fsdp import attach_fsdp2, has_dtensors
from .fsdp1 import attach_fsdp1, find_fsdp1_model

_MAX_FRAMES = 12  # step() wrappers (no_grad, profiling hooks) sit between the engine and us


def _calling_wrapper(optimizer: Any, is_wrapper: Callable[[Any], bool]) -> Any | None:
    """The wrapper (``is_wrapper``) whose method called ``optimizer.step()``, found in the caller frames."""
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        frame = frame.f_back
        if frame is None:
            return None
        caller = frame.f_locals.get("self")
        if caller is not None and is_wrapper(caller) and getattr(caller, "optimizer", None) is optimizer:
            return caller
    return None


def auto_attach(optimizer: Any) -> bool:
    """Attach the layout of the engine that handed ``optimizer`` its tensors, if it can be found."""
    if has_dtensors(optimizer):
        attach_fsdp2(None, optimizer)
        return True
    zero_opt = _calling_wrapper(optimizer, is_zero_optimizer)
    if zero_opt is not None:
        attach_deepspeed(zero_opt, optimizer)
        return True
    wrapper = _calling_wrapper(optimizer, holds_full_copies)
    if wrapper is not None and full_copies_of(wrapper, optimizer):
        # full-shape fp32 copies of the parameters: stepped exactly as the parameters themselves
        optimizer._record_given()
        return True
    fsdp1_model = find_fsdp1_model(optimizer)
    if fsdp1_model is not None:
        attach_fsdp1(fsdp1_model, optimizer)
        return True
    return False
