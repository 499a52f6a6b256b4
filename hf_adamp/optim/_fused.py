"""Glue between the phased step and the fused CPU kernels of ``hf_adamp.kernels``.

Each local tensor's segments are merged back into runs (parameter pieces, not cache-sized chunks), and every
run gets a pass-1 mode. All runs of a step (of one state dtype) go to the kernels in one call per pass, as a
table, so the step costs one parallel region per pass instead of one per tensor:

* FULL: never projected (1-D parameters): the whole step in one pass;
* FIRST: moments and row sums in pass 1, the decided step in pass 2 (40 bytes per fp32 parameter);
* SPEC: the previous step did not project this parameter: the whole step in one pass, guessing that it stays
  unprojected;
* SPEC_CHANNEL: the previous step projected it channel-wise and the run holds whole rows: the whole step in one
  pass, each row projected with its own coefficient as it is computed (the row stays in cache).

A speculating run moves the bytes of torch's fused AdamW/SGD (28 bytes per fp32 parameter for Adam), and a right
guess gives exactly the bits of the two-pass step. Pass 2 repairs the rows of a wrong guess, recovering the old
weight in double (an ulp or two of fp32/fp64); fp16/bf16 weights would lose far more, so they always take FIRST,
as do layer-projected parameters (their coefficient needs the whole tensor's sums before any element is final).
The guess is the previous step's outcome, kept per run in the optimizer state under ``last_projection``
(a list of ints), so that a run resumed from a checkpoint guesses, and rounds, exactly like an uninterrupted one.
``HF_ADAMP_SPECULATE=0`` turns speculation off (two passes for every projectable run).
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import kernels, projection
from ..sharding.layout import Segment
from ._base import Item, flat, state_dtype

FIRST, FULL, SPEC, SPEC_CHANNEL = 0, 1, 2, 3
# pass-2 mode for each pass-1 mode: apply the decision, or repair a guess
APPLY, REPAIR, REPAIR_CHANNEL = 0, 1, 2
PASS2 = {FIRST: APPLY, SPEC: REPAIR, SPEC_CHANNEL: REPAIR_CHANNEL}
MEMORY_KEY = "last_projection"
RUN_COLS = 7  # a run in the kernels' table: tensor index, start, rows, row length, mode, first stats row, slot
SPECULATE_ENV = "HF_ADAMP_SPECULATE"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Repairs divide by the speculated decay; below this they would lose precision (huge weight decay only).
_MIN_SPEC_DECAY = 0.5


@dataclass
class Plan:
    """What pass 1 did to one local tensor, for pass 2."""

    runs: list[Segment]
    modes: list[int]
    tensors: list[Tensor]  # grad, param, then the state tensors (the kernels address their storage)
    decays: tuple[float, float]  # the weight-decay factors (not projected, projected) pass 1 used


def usable(opt: Any, item: Item, state_keys: tuple[str, ...]) -> bool:
    """The kernels can step this tensor: CPU, a supported dtype, gradient and state in the expected dtypes."""
    p = item.param
    if not p.is_cpu or p.dtype not in _DTYPES or item.grad.dtype != p.dtype:
        return False
    dtype, state = state_dtype(p), item.state
    return all(state[k].dtype == dtype for k in state_keys) and opt.kernels_available()


def speculation_enabled() -> bool:
    return os.environ.get(SPECULATE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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


def plan(opt: Any, item: Item, state_keys: tuple[str, ...], decays: tuple[float, float], stats: Tensor) -> Plan:
    """Runs and their pass-1 modes, from what the previous step decided for each run."""
    key = id(item.param)
    segs = item.segments
    cached = _runs_cache(opt).get(key)
    if cached is not None and (cached[0] is segs or cached[0] == segs):  # the same list, or equal small tuples
        runs = cached[1]
    else:
        flat(item.param)  # raises, with advice, where the rows are not contiguous in memory
        runs = merge_runs(segs)
        _runs_cache(opt)[key] = (segs, runs)
    tensors = [item.grad, item.param] + [item.state[k] for k in state_keys]
    if all(run.slot < 0 for run in runs):  # never projected: nothing to guess
        return Plan(runs, [FULL] * len(runs), tensors, decays)
    memory = item.state.get(MEMORY_KEY)
    if not isinstance(memory, list) or len(memory) != len(runs):
        memory = None
    speculate = (
        memory is not None
        and opt.once_per_step("speculate", speculation_enabled)
        and state_dtype(item.param) == item.param.dtype
        and min(decays) >= _MIN_SPEC_DECAY
    )
    modes = []
    for i, run in enumerate(runs):
        if run.slot < 0:
            modes.append(FULL)
        elif not speculate or memory[i] == projection.LAYER:
            modes.append(FIRST)
        elif memory[i] == projection.CHANNEL:
            # whole rows only: a row cut by a shard boundary needs the other ranks' sums for its coefficient
            whole = run.row_len == item.specs[run.slot].row_len
            modes.append(SPEC_CHANNEL if whole else FIRST)
        else:
            modes.append(SPEC)
    return Plan(runs, modes, tensors, decays)


def first(opt: Any, items: list[Item], stats: Tensor) -> None:
    """Pass 1 of every item (all on the kernels): one kernel call per state dtype."""
    keys = opt._STATE_KEYS
    launch = getattr(kernels.module(), opt._KERNELS + "_first")
    for dtype, batch in _by_state_dtype(items):
        tensors: list[Tensor] = []
        runs, scalars = array("q"), array("d")
        for item in batch:
            p = plan(opt, item, keys, opt._decay_factors(item.group), stats)
            index = len(tensors) // len(p.tensors)
            tensors += p.tensors
            for run, mode in zip(p.runs, p.modes):
                runs.extend((index, run.start, run.rows, run.row_len, mode, max(run.stat_row, 0), run.slot))
                scalars.extend(opt._kernel_scalars(item, pass1_decay(p, mode)))
            if any(mode != FULL for mode in p.modes):
                item.extra["fused"] = p
        if runs:  # none only where every tensor is empty
            count = len(runs) // RUN_COLS
            launch(tensors, _table(runs, count), _table(scalars, count), stats, _spec_coef(opt, stats, dtype))


def second(opt: Any, items: list[Item], coefs: dict[torch.dtype, Tensor], decay: Tensor) -> None:
    """Pass 2 of the items pass 1 left unfinished, one kernel call per state dtype. Keeps each item's outcome
    for the next step's guess."""
    launch = getattr(kernels.module(), opt._KERNELS + "_second")
    for dtype, batch in _by_state_dtype(items):
        tensors: list[Tensor] = []
        runs, scalars = array("q"), array("d")
        for item in batch:
            p = item.extra.pop("fused", None)
            if p is None:
                continue
            index = len(tensors) // len(p.tensors)
            added = False
            for run, mode in zip(p.runs, p.modes):
                if needs_pass2(opt, run, mode):
                    runs.extend((index, run.start, run.rows, run.row_len, PASS2[mode], run.stat_row, run.slot))
                    scalars.extend(opt._kernel_scalars(item, pass1_decay(p, mode)))
                    added = True
            if added:
                tensors += p.tensors
            remember(opt, item, p)
        if runs:
            coef = coefs[dtype]
            count = len(runs) // RUN_COLS
            launch(tensors, _table(runs, count), _table(scalars, count), coef, _spec_coef(opt, coef, dtype), decay)


def _by_state_dtype(items: list[Item]) -> list[tuple[torch.dtype, list[Item]]]:
    groups: dict[torch.dtype, list[Item]] = {}
    for item in items:
        groups.setdefault(state_dtype(item.param), []).append(item)
    return list(groups.items())


def _table(values: array, rows: int) -> Tensor:
    """A (rows, -1) table of the kernels (runs: int64; scalars: float64) viewing the array's memory, no copy (the
    array lives until the kernel call returns)."""
    return torch.frombuffer(values, dtype=torch.int64 if values.typecode == "q" else torch.float64).view(rows, -1)


def pass1_decay(plan: Plan, mode: int) -> float:
    """The weight-decay factor a pass-1 mode applies (a guess of the decision for speculating modes)."""
    return plan.decays[1] if mode == SPEC_CHANNEL else plan.decays[0]


def needs_pass2(opt: Any, run: Segment, mode: int) -> bool:
    """FULL runs are done; so is a SPEC_CHANNEL run whose decision is channel (the kernels' decision computes
    each row's coefficient exactly as the guess did)."""
    if mode == FULL:
        return False
    return mode != SPEC_CHANNEL or opt._slot_kinds()[run.slot] != projection.CHANNEL


def remember(opt: Any, item: Item, plan: Plan) -> None:
    """Keep this step's outcome of every run in the state: the next step's guess."""
    kinds = opt._slot_kinds()
    item.state[MEMORY_KEY] = [kinds[run.slot] if run.slot >= 0 else projection.NONE for run in plan.runs]


def _spec_coef(opt: Any, rows: Tensor, dtype: torch.dtype) -> Tensor:
    # one buffer per dtype, indexed by statistics row like the decided coefficients (rows: the stats buffer or
    # the coefficients, whose last dimension counts the rows)
    cache = opt.__dict__.setdefault("_fused_spec_coef", {})
    buf = cache.get(dtype)
    if buf is None or buf.numel() < rows.shape[-1]:
        buf = cache[dtype] = torch.zeros(rows.shape[-1], dtype=dtype)
    return buf


def _runs_cache(opt: Any) -> dict[int, tuple[list[Segment], list[Segment]]]:
    # merged runs per tensor, reused while its segments are the same (they are rebuilt every step)
    cache = opt.__dict__.get("_fused_runs")
    if cache is None:
        cache = opt.__dict__["_fused_runs"] = {}
    return cache
