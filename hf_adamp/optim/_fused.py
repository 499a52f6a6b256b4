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
guess gives exactly the bits of the two-pass step. Pass 2 repairs the rows of a wrong guess with a small
correction of the guessed weight (within about an ulp of fp32/fp64 of the two-pass step); the guessed weight's own
rounding would cost fp16/bf16 weights far more, so they always take FIRST, as do steadily layer-projected
parameters (their coefficient needs the whole tensor's sums before any element is final).
The guess comes from the last two steps' outcomes, kept per run in the optimizer state under ``last_projection``
(a list of ints, ``last + 3 * the one before``), so that a run resumed from a checkpoint guesses, and rounds,
exactly like an uninterrupted one. A parameter takes FIRST only after two layer projections in a row: after one, it
speculates "not projected", because a repair costs what FIRST's second pass costs (Adam: 44 against 40 bytes per
fp32 parameter), while an outcome that changes from step to step saves the second pass whenever it turns to none.
``HF_ADAMP_SPECULATE=0`` turns speculation off (two passes for every projectable run).

The tables (``KernelBatch``) are built once and kept across steps while the step's tensors stay the same (see
``_base.StepContext``): a step only refills the gradients, the modes and the scalars.
"""

from __future__ import annotations

import os
from array import array
from typing import Any

import torch
from torch import Tensor

from .. import kernels, projection
from ..sharding.layout import Segment
from ._base import Item, flat, state_dtype

FIRST, FULL, SPEC, SPEC_CHANNEL = 0, 1, 2, 3
# pass-2 mode for each pass-1 mode: apply the decision, or repair a guess (FULL runs have no pass 2)
APPLY, REPAIR, REPAIR_CHANNEL = 0, 1, 2
PASS2 = {FIRST: APPLY, SPEC: REPAIR, SPEC_CHANNEL: REPAIR_CHANNEL}
_PASS2_OF = torch.tensor([APPLY, -1, REPAIR, REPAIR_CHANNEL])  # indexed by pass-1 mode
MEMORY_KEY = "last_projection"
_LAYER_TWICE = projection.LAYER + 3 * projection.LAYER  # the memory of two layer projections in a row
RUN_COLS = 7  # a run in the kernels' table: tensor index, start, rows, row length, mode, first stats row, slot
_MODE = 4  # the mode's column
SPECULATE_ENV = "HF_ADAMP_SPECULATE"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Repairs divide by the speculated decay; below this they would lose precision (huge weight decay only).
_MIN_SPEC_DECAY = 0.5


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


def batches(opt: Any, items: list[Item]) -> list[KernelBatch]:
    """The kernels' batches of these items, one per state dtype (one kernel call per pass each)."""
    by_dtype: dict[torch.dtype, list[Item]] = {}
    for item in items:
        by_dtype.setdefault(state_dtype(item.param), []).append(item)
    return [KernelBatch(opt, batch, dtype) for dtype, batch in by_dtype.items()]


class KernelBatch:
    """The kernels' tables for the runs of the tensors of one state dtype.

    Built from a step's items and kept while they stay the same: each step refills the gradients, the runs'
    modes and their scalars (the hyperparameters may change between steps) in place. The tables are
    ``torch.frombuffer`` views of ``array`` memory: cheap to write from Python, read by the kernels without a copy.
    The arrays are never resized (the views would dangle).
    """

    def __init__(self, opt: Any, items: list[Item], dtype: torch.dtype) -> None:
        keys = opt._STATE_KEYS
        self.dtype, self.items, self.per = dtype, items, 2 + len(keys)
        self.tensors: list[Tensor | None] = []  # per item: grad (refilled every step), param, state tensors
        self.spans: list[range] = []  # per item: its runs
        self.slots: list[int] = []  # per run: its parameter slot (-1: never projected)
        self.whole: list[bool] = []  # per run: holds whole rows, so a channel guess can finish it in pass 1
        self.exact: list[bool] = []  # per item: the weight is in the state dtype, so a repair is exact enough
        runs = array("q")
        for index, item in enumerate(items):
            flat(item.param)  # a guard: the kernels read raw memory, and strided weights reach here as dense copies
            self.tensors += [None, item.param] + [item.state[k] for k in keys]
            first = len(self.slots)
            for run in merge_runs(item.segments):
                mode = FULL if run.slot < 0 else FIRST
                runs.extend((index, run.start, run.rows, run.row_len, mode, max(run.stat_row, 0), run.slot))
                self.slots.append(run.slot)
                self.whole.append(run.slot >= 0 and run.row_len == item.specs[run.slot].row_len)
            self.spans.append(range(first, len(self.slots)))
            self.exact.append(item.param.dtype == dtype)
        self.count = len(self.slots)
        self.projectable = [any(self.slots[j] >= 0 for j in span) for span in self.spans]
        self.pass2_runs = [j for j, slot in enumerate(self.slots) if slot >= 0]
        self._memory: list[list[int] | None] = [None] * len(items)  # per item: the memory first() read
        self._runs = runs
        self.runs = torch.frombuffer(runs, dtype=torch.int64).view(self.count, RUN_COLS) if self.count else None
        self._scalars: array | None = None  # allocated at the first fill, once the row width is known
        self.scalars: Tensor | None = None

    def first(self, opt: Any, stats: Tensor) -> None:
        """Pass 1 of every run: count the step, choose each run's mode, fill the scalars, launch."""
        runs, slots, whole = self._runs, self.slots, self.whole
        speculate_env = opt.once_per_step("speculate", speculation_enabled)
        per_group: dict[int, tuple[tuple[float, float], bool]] = {}
        rows: dict[tuple[int, int, bool], array] = {}
        for index, item in enumerate(self.items):
            self.tensors[index * self.per] = item.grad
            group = item.group
            step = opt._advance_step(item.state)
            known = per_group.get(id(group))
            if known is None:
                decays = opt._decay_factors(group)
                known = per_group[id(group)] = (decays, speculate_env and min(decays) >= _MIN_SPEC_DECAY)
            decays, may_speculate = known
            span = self.spans[index]
            memory = item.state.get(MEMORY_KEY) if self.projectable[index] else None
            if not isinstance(memory, list) or len(memory) != len(span):
                memory = None
            self._memory[index] = memory  # for second(): the next memory keeps this one's last outcome
            speculate = may_speculate and self.exact[index] and memory is not None
            for k, j in enumerate(span):
                if slots[j] < 0:
                    mode = FULL
                elif not speculate or memory[k] == _LAYER_TWICE:
                    mode = FIRST
                elif memory[k] % 3 == projection.CHANNEL:
                    # whole rows only: a row cut by a shard boundary needs the other ranks' sums for its coefficient
                    mode = SPEC_CHANNEL if whole[j] else FIRST
                else:
                    mode = SPEC
                runs[j * RUN_COLS + _MODE] = mode
                key = (id(group), step, mode == SPEC_CHANNEL)
                row = rows.get(key)
                if row is None:
                    decay = decays[1] if mode == SPEC_CHANNEL else decays[0]
                    row = rows[key] = array("d", opt._kernel_scalars(group, step, decay))
                self._put_scalars(j, row)
        if self.count:
            launch = getattr(kernels.module(), opt._KERNELS + "_first")
            launch(self.tensors, self.runs, self.scalars, stats, _spec_coef(opt, stats, self.dtype))

    def second(self, opt: Any, coef: Tensor, decay: Tensor) -> None:
        """Pass 2 of the runs pass 1 left unfinished; keeps each run's outcome for the next step's guess."""
        kinds = opt._slot_kinds()
        runs, slots = self._runs, self.slots
        # a channel guess that the decision confirms is done: the kernels computed each row's coefficient exactly
        # as the decision does
        take = [
            j
            for j in self.pass2_runs
            if runs[j * RUN_COLS + _MODE] != SPEC_CHANNEL or kinds[slots[j]] != projection.CHANNEL
        ]
        if take:
            index = torch.tensor(take)
            pass2 = self.runs.index_select(0, index)
            pass2[:, _MODE] = _PASS2_OF[pass2[:, _MODE]]
            scalars, spec_coef = self.scalars.index_select(0, index), _spec_coef(opt, coef, self.dtype)
            getattr(kernels.module(), opt._KERNELS + "_second")(self.tensors, pass2, scalars, coef, spec_coef, decay)
        for index, item in enumerate(self.items):
            if self.projectable[index]:
                span = self.spans[index]
                memory = self._memory[index] or [projection.NONE] * len(span)
                item.state[MEMORY_KEY] = [
                    (kinds[slots[j]] if slots[j] >= 0 else projection.NONE) + 3 * (memory[k] % 3)
                    for k, j in enumerate(span)
                ]

    def holds_state_of(self, keys: tuple[str, ...]) -> bool:
        """The items' state tensors are still the ones in the tables (none was replaced in the state dicts)."""
        tensors, per = self.tensors, self.per
        for index, item in enumerate(self.items):
            state = item.state
            for k, key in enumerate(keys):
                if state.get(key) is not tensors[index * per + 2 + k]:
                    return False
        return True

    def release(self) -> None:
        """Drop the step's gradients (the tables outlive the step, the gradients must not)."""
        for index in range(len(self.items)):
            self.tensors[index * self.per] = None

    def _put_scalars(self, run: int, row: array) -> None:
        width = len(row)
        if self._scalars is None:
            self._scalars = array("d", bytes(8 * width * self.count))
            self.scalars = torch.frombuffer(self._scalars, dtype=torch.float64).view(self.count, width)
        self._scalars[run * width : (run + 1) * width] = row


def _spec_coef(opt: Any, rows: Tensor, dtype: torch.dtype) -> Tensor:
    # one buffer per dtype, indexed by statistics row like the decided coefficients (rows: the stats buffer or
    # the coefficients, whose last dimension counts the rows)
    cache = opt.__dict__.setdefault("_fused_spec_coef", {})
    buf = cache.get(dtype)
    if buf is None or buf.numel() < rows.shape[-1]:
        buf = cache[dtype] = torch.zeros(rows.shape[-1], dtype=dtype)
    return buf
