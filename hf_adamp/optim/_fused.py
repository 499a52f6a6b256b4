"""Glue between the phased step and the fused CPU kernels of ``hf_adamp.kernels``.

Each local tensor's segments are merged back into runs (one kernel call per parameter piece, not per
cache-sized chunk), and every projectable run gets a pass-1 mode:

* FULL: never projected (1-D parameters): the whole step in one pass;
* FIRST: projectable: moments and row sums in pass 1, the decided step in pass 2;
* SPEC (opt-in, ``HF_ADAMP_SPECULATE=1``): projectable, and not projected at the previous step: the whole
  step in one pass, speculating that it stays unprojected; pass 2 repairs the rows whose decision says
  otherwise (rare, costs one more pass).

SPEC moves the bytes of torch's fused AdamW/SGD (one read of g, p and the state, one write of p and the
state) instead of the ~1.4x of two passes. It recovers the old weight as (p_new + step * u) / decay, which
costs an ulp or two of fp32/fp64 on repaired rows, and would cost far more on fp16/bf16 weights, which
therefore always take FIRST. It is off by default: the result then depends on what the previous step
decided, which is not in the optimizer's state, so a run resumed from a checkpoint would differ from an
uninterrupted one by those ulps instead of being bit-identical.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..sharding.layout import Segment
from ._base import Item, flat, state_dtype

FIRST, FULL, SPEC = 0, 1, 2
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Speculation divides by the decay factor; below this it would lose precision (huge weight decay only).
_MIN_SPEC_DECAY = 0.5
SPECULATE_ENV = "HF_ADAMP_SPECULATE"


@dataclass
class Plan:
    """What pass 1 did to one local tensor, for pass 2."""

    runs: list[Segment]
    modes: list[int]
    tensors: list[Tensor]  # grad, param, then the state tensors (the kernels address their storage)


def usable(item: Item, state_keys: tuple[str, ...]) -> bool:
    """The kernels can step this tensor: CPU, a supported dtype, gradient and state in the expected dtypes."""
    p = item.param
    return (
        p.device.type == "cpu"
        and p.dtype in _DTYPES
        and item.grad.dtype == p.dtype
        and all(item.state[k].dtype == state_dtype(p) for k in state_keys)
        and kernels.available()
    )


def merge_runs(segments: list[Segment]) -> list[Segment]:
    """Adjacent segments that continue each other in memory and in statistics rows, joined.

    Element-wise segments join into one long row; projectable ones join when they share the slot and the
    row length and their statistics rows follow on (a row's sums only depend on the row's own elements).
    """
    out: list[Segment] = []
    for seg in segments:
        if out:
            last = out[-1]
            follows = last.start + last.rows * last.row_len == seg.start
            if follows and last.slot < 0 and seg.slot < 0:
                out[-1] = last._replace(rows=1, row_len=last.rows * last.row_len + seg.rows * seg.row_len)
                continue
            if (
                follows
                and seg.slot == last.slot
                and seg.row_len == last.row_len
                and seg.stat_row == last.stat_row + last.rows
            ):
                out[-1] = last._replace(rows=last.rows + seg.rows)
                continue
        out.append(seg)
    return out


def plan(opt: Any, item: Item, state_keys: tuple[str, ...], decay: float) -> Plan:
    """Runs and their pass-1 modes, from what the previous step decided for each run."""
    projected_before = _memory(opt)
    key = id(item.param)
    segs = item.segments
    cached = _runs_cache(opt).get(key)
    if cached is not None and cached[0] == segs:  # a cheap comparison of small tuples, no merging
        runs = cached[1]
    else:
        flat(item.param)  # raises, with advice, where the rows are not contiguous in memory
        runs = merge_runs(segs)
        _runs_cache(opt)[key] = (list(segs), runs)
    speculate = (
        os.environ.get(SPECULATE_ENV) == "1"
        and state_dtype(item.param) == item.param.dtype
        and decay >= _MIN_SPEC_DECAY
    )
    modes = [
        FULL if run.slot < 0 else SPEC if speculate and not projected_before.get((key, run.start), False) else FIRST
        for run in runs
    ]
    return Plan(runs, modes, [item.grad, item.param] + [item.state[k] for k in state_keys])


def remember(opt: Any, item: Item, run: Segment, projected_rows: int) -> None:
    _memory(opt)[id(item.param), run.start] = projected_rows > 0


def _runs_cache(opt: Any) -> dict[int, tuple[list[Segment], list[Segment]]]:
    # merged runs per tensor, reused while its segments are the same (they are rebuilt every step)
    cache = opt.__dict__.get("_fused_runs")
    if cache is None:
        cache = opt.__dict__["_fused_runs"] = {}
    return cache


def _memory(opt: Any) -> dict[tuple[int, int], bool]:
    # a runtime attribute (not state): the previous step's outcome per run, used to choose SPEC or FIRST
    memory = opt.__dict__.get("_fused_projected")
    if memory is None:
        memory = opt.__dict__["_fused_projected"] = {}
    return memory
