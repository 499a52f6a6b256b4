"""Tensor views and the dtype policy of the optimizer state: leaf helpers shared by the step and the kernels.

Nothing here imports another hf_adamp module, so any module may use it.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: this module imports no other hf_adamp module
    from .sharding.layout import Segment


def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state (moments) is kept in fp32 for half-precision parameters, else in their dtype."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


def compute_copy(t: Tensor) -> Tensor:
    """The tensor in its compute dtype: itself for fp32/fp64, an fp32 copy for fp16/bf16."""
    dt = state_dtype(t)
    return t if t.dtype == dt else t.to(dt)


def is_dense(t: Tensor) -> bool:
    """The tensor's elements fill its storage span without gaps or overlaps (any order of dimensions)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda x: x[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def rows_dense(t: Tensor) -> bool:
    """The tensor's elements fill its storage span with the first dimension outermost, so ``flat`` can view it.

    Row sums do not depend on the order inside a row, so any such dense layout works (contiguous, or
    channels_last for conv weights).
    """
    if t.is_contiguous():
        return True
    return t.dim() > 1 and t.stride(0) * t.shape[0] == t.numel() and sorted(t.stride())[0] == 1 and is_dense(t)


def flat(t: Tensor) -> Tensor:
    """The tensor's storage as a 1-D view in memory order (see ``rows_dense``; the step gives other tensors a
    dense working copy)."""
    if t.is_contiguous():
        return t.view(-1)
    if rows_dense(t):
        return t.as_strided((t.numel(),), (1,))
    raise RuntimeError(
        f"hf_adamp: a tensor of shape {tuple(t.shape)} with strides {t.stride()} is not stored densely row by row"
    )


def make_state_dense(state: MutableMapping[str, Any], shape: torch.Size) -> None:
    """State tensors of a strided parameter, made contiguous once (they then stay so) for its working copy."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == shape and not rows_dense(value):
            state[key] = value.contiguous()


def seg_view(flat_tensor: Tensor, seg: Segment) -> Tensor:
    """The segment's elements as a (rows, row_len) view."""
    n = seg.rows * seg.row_len
    return flat_tensor[seg.start : seg.start + n].view(seg.rows, seg.row_len)


def write_back(param: Tensor, computed: Tensor) -> None:
    if computed is not param:
        param.copy_(computed)


def load_segment(src: Tensor, buf: Tensor, seg: Segment, upcast: bool, negate: bool) -> Tensor:
    """A segment in the compute dtype: the view itself, or a copy in scratch memory."""
    if not upcast and not negate:
        return src
    out = buf.view(seg.rows, seg.row_len)
    if negate:
        torch.neg(src, out=out) if not upcast else out.copy_(src).neg_()
    else:
        out.copy_(src)
    return out
