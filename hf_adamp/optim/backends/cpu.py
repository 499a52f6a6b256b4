"""The cpu backend: the C++ kernels of ``hf_adamp.kernels``, all runs of a step in one call per pass.

Each tensor's segments are merged back into runs (parameter pieces, not cache-sized chunks), and every run gets
a pass-1 mode (``kernels.tables.PASS1``). All runs of a step (of one state dtype) go to the kernels in one call
per pass, as a table, so the step costs one parallel region per pass instead of one per tensor:

* full: never projected (1-D parameters): the whole step in one pass;
* first: moments and row sums in pass 1, the decided step in pass 2 (40 bytes per fp32 parameter);
* spec: the previous step did not project this parameter: the whole step in one pass, guessing that it stays
  unprojected;
* spec_channel: the previous step projected it channel-wise and the run holds whole rows: the whole step in one
  pass, each row projected with its own coefficient as it is computed (the row stays in cache).

A speculating run moves the bytes of torch's fused AdamW/SGD (28 bytes per fp32 parameter for Adam), and a right
guess gives exactly the bits of the two-pass step. Pass 2 repairs the rows of a wrong guess with a small
correction of the guessed weight (within about an ulp of fp32/fp64 of the two-pass step); the guessed weight's own
rounding would cost fp16/bf16 weights far more, so they always take first, as do steadily layer-projected
parameters (their coefficient needs the whole tensor's sums before any element is final).
The guess comes from the last two steps' outcomes, which the engine keeps per parameter slot in the state under
``last_projection`` (``last + 3 * the one before``), so that a run resumed from a checkpoint guesses, and rounds,
exactly like an uninterrupted one. A parameter takes first only after two layer projections in a row: after one, it
speculates "not projected", because a repair costs what first's second pass costs (Adam: 44 against 40 bytes per
fp32 parameter), while an outcome that changes from step to step saves the second pass whenever it turns to none.
``HF_ADAMP_SPECULATE=0`` turns speculation off (two passes for every projectable run).

The tables (``KernelBatch``) are built once per step context and kept while the step's tensors stay the same: a
step only refills the gradients, the modes and the scalars, and checks the layout of the gradients only
(``kernels.TensorTable``).
"""

from __future__ import annotations

from array import array

import torch
from torch import Tensor

from ... import kernels, projection
from ..._tensors import flat, state_dtype
from ...kernels.tables import MODE_COLUMN, PASS1, PASS2, PASS2_OF_PASS1, RUN_COLS
from ...sharding.layout import merge_runs
from .._step import MEMORY_KEY, Decided, Item, Switches, memory_of
from .base import Backend

FIRST, FULL, SPEC, SPEC_CHANNEL = (PASS1[m] for m in ("first", "full", "spec", "spec_channel"))
APPLY, REPAIR, REPAIR_CHANNEL = (PASS2[m] for m in ("apply", "repair", "repair_channel"))
_PASS2_OF = torch.full((len(PASS1),), -1, dtype=torch.int64)  # indexed by pass-1 mode
for _mode, _then in PASS2_OF_PASS1.items():
    _PASS2_OF[PASS1[_mode]] = PASS2[_then]
_LAYER_TWICE = projection.LAYER + 3 * projection.LAYER  # the memory of two layer projections in a row
DTYPES = tuple(kernels.DTYPE_CODES)
# Repairs divide by the speculated decay; below this they would lose precision (huge weight decay only).
_MIN_SPEC_DECAY = 0.5


class CpuKernels(Backend):
    name = "cpu"
    decides_on_host = True

    def __init__(self, rule) -> None:
        super().__init__(rule)
        self._spec_coef: dict[torch.dtype, Tensor] = {}

    def refusal(self, item: Item, switches: Switches) -> str | None:
        p = item.param
        if not p.is_cpu:
            return f"the C++ kernels step CPU tensors (got one on {p.device})"
        if p.dtype not in DTYPES or item.grad.dtype != p.dtype:
            return (
                "the C++ kernels take fp32/fp64/fp16/bf16 weights with gradients of their dtype "
                f"(got {p.dtype} and {item.grad.dtype})"
            )
        dtype = state_dtype(p)
        if any(item.state[k].dtype != dtype for k in self.rule.state_keys):
            return f"the C++ kernels need the state in {dtype}"
        if switches.kernels_disabled:
            return f"{kernels.DISABLE_ENV}=1 is set"
        if not switches.cpu_kernels:
            return f"the C++ kernels are unavailable ({kernels.unavailable_reason()})"
        return None

    def prepare(self, items: list[Item]) -> list[KernelBatch]:
        by_dtype: dict[torch.dtype, list[Item]] = {}
        for item in items:
            by_dtype.setdefault(state_dtype(item.param), []).append(item)
        return [KernelBatch(self.rule.kernels, self.rule.state_keys, batch, dtype) for dtype, batch in by_dtype.items()]

    def holds(self, batch: list[KernelBatch]) -> bool:
        return all(b.holds_state_of(self.rule.state_keys) for b in batch)

    def first(self, batch: list[KernelBatch], stats: Tensor, switches: Switches) -> None:
        for b in batch:
            b.first(stats, self._spec_coef_buffer(stats, b.dtype), switches.speculate)

    def second(self, batch: list[KernelBatch], decided: Decided) -> None:
        for b in batch:
            coef = decided.coef[b.dtype]
            b.second(decided.kinds(), coef, self._spec_coef_buffer(coef, b.dtype), decided.decay)

    def release(self, batch: list[KernelBatch]) -> None:
        for b in batch:
            b.release()

    def clear(self) -> None:
        self._spec_coef.clear()

    def decide(self, stats: Tensor, counts, row_len, numel, delta, eps) -> projection.Decision:
        """``projection.decide``'s maths in one C++ loop (the decision the kernels' channel guesses match)."""
        return projection.Decision(*kernels.module().decide(stats, counts, row_len, numel, delta, eps))

    def _spec_coef_buffer(self, rows: Tensor, dtype: torch.dtype) -> Tensor:
        # one buffer per dtype, indexed by statistics row like the decided coefficients (rows: the stats buffer or
        # the coefficients, whose last dimension counts the rows)
        buf = self._spec_coef.get(dtype)
        if buf is None or buf.numel() < rows.shape[-1]:
            buf = self._spec_coef[dtype] = torch.zeros(rows.shape[-1], dtype=dtype)
        return buf


class KernelBatch:
    """The kernels' tables for the runs of the tensors of one state dtype.

    Built from a step's items and kept while they stay the same: each step refills the gradients, the runs'
    modes and their scalars (the hyperparameters may change between steps) in place. The tables are
    ``torch.frombuffer`` views of ``array`` memory: cheap to write from Python, read by the kernels without a copy.
    The arrays are never resized (the views would dangle).
    """

    def __init__(self, family: str, keys: tuple[str, ...], items: list[Item], dtype: torch.dtype) -> None:
        self.family, self.dtype, self.items, self.per = family, dtype, items, 2 + len(keys)
        self.tensors: list[Tensor | None] = []  # per item: grad (refilled every step), param, state tensors
        self.spans: list[range] = []  # per item: its runs
        self.slots: list[int] = []  # per run: its parameter slot (-1: never projected)
        self.slot_pos: list[int] = []  # per run: its slot's index in the item's slots (its memory entry)
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
                self.slot_pos.append(item.slots.index(run.slot) if run.slot >= 0 else -1)
                self.whole.append(run.slot >= 0 and run.row_len == item.specs[run.slot].row_len)
            self.spans.append(range(first, len(self.slots)))
            self.exact.append(item.param.dtype == dtype)
        self.count = len(self.slots)
        self.pass2_runs = [j for j, slot in enumerate(self.slots) if slot >= 0]
        self._runs = runs
        self.runs = torch.frombuffer(runs, dtype=torch.int64).view(self.count, RUN_COLS) if self.count else None
        self._scalars: array | None = None  # allocated at the first fill, once the row width is known
        self.scalars: Tensor | None = None
        self.table: kernels.TensorTable | None = None  # this step's, read by both passes; kept for the next one

    def first(self, stats: Tensor, spec_coef: Tensor, speculate_env: bool) -> None:
        """Pass 1 of every run: choose each run's mode, fill the scalars, launch."""
        runs, slots, whole, slot_pos = self._runs, self.slots, self.whole, self.slot_pos
        rows: dict[tuple[int, bool], array] = {}
        for index, item in enumerate(self.items):
            self.tensors[index * self.per] = item.grad
            s = item.scalars
            may_speculate = speculate_env and self.exact[index] and min(s.decay, s.projected_decay) >= _MIN_SPEC_DECAY
            memory = item.state.get(MEMORY_KEY) if may_speculate and item.slots else None
            if memory is not None and (type(memory) is not list or len(memory) != len(item.slots)):
                memory = memory_of(item)  # another form: a device tensor, an older checkpoint's
            for j in self.spans[index]:
                if slots[j] < 0:
                    mode = FULL
                elif memory is None or memory[slot_pos[j]] == _LAYER_TWICE:
                    mode = FIRST
                elif memory[slot_pos[j]] % 3 == projection.CHANNEL:
                    # whole rows only: a row cut by a shard boundary needs the other ranks' sums for its coefficient
                    mode = SPEC_CHANNEL if whole[j] else FIRST
                else:
                    mode = SPEC
                runs[j * RUN_COLS + MODE_COLUMN] = mode
                key = (id(s), mode == SPEC_CHANNEL)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = array("d", s.kernel_row(s.projected_decay if key[1] else s.decay))
                self._put_scalars(j, row)
        if self.count:
            self.table = kernels.TensorTable(self.tensors, self.per, self.table)
            launch = getattr(kernels.module(), self.family + "_first")
            launch(self.table, self.runs, self.scalars, stats, spec_coef)

    def second(self, kinds: list[int], coef: Tensor, spec_coef: Tensor, decay: Tensor) -> None:
        """Pass 2 of the runs pass 1 left unfinished."""
        runs, slots = self._runs, self.slots
        # a channel guess that the decision confirms is done: the kernels computed each row's coefficient exactly
        # as the decision does
        take = [
            j
            for j in self.pass2_runs
            if runs[j * RUN_COLS + MODE_COLUMN] != SPEC_CHANNEL or kinds[slots[j]] != projection.CHANNEL
        ]
        if take:
            index = torch.tensor(take)
            pass2 = self.runs.index_select(0, index)
            pass2[:, MODE_COLUMN] = _PASS2_OF[pass2[:, MODE_COLUMN]]
            scalars = self.scalars.index_select(0, index)
            getattr(kernels.module(), self.family + "_second")(self.table, pass2, scalars, coef, spec_coef, decay)

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
