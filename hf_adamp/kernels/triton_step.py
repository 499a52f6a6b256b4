"""Triton kernels of the AdamP and SGDP steps, for CUDA tensors (the maths in hf_adamp/projection.py).

Same two-pass structure as the C++ CPU kernels (``adamp_cpu.cpp``). A call works on one run of a flat tensor
viewed as (rows, row_len); the state and all arithmetic are fp32, and fp16/bf16 weights are rounded once.

* pass 1 updates the moments and adds the four row sums g.p, g.g, p.p, p.u into the (4, total_rows) stats
  buffer; element-wise (never projected) runs finish the whole step there instead;
* pass 2 reads each row's coefficient and the slot's weight-decay factor from device tensors (by pointer, so
  the decision never travels to the host) and applies the projected step.

A program covers a tile of ROWS x BLOCK elements: several short rows, or one block of a long row. The sums of a
row that spans several blocks go to a scratch buffer of partial sums, added in a fixed order by a second small
kernel: no atomics, so a step is reproducible bit for bit. The grid is 1-D (CUDA's second and third grid
dimensions stop at 65535, which a row of a few hundred million elements would pass).

Importing this module imports triton; hf_adamp only does so when a tensor is about to take this path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: enough work per program to hide memory latency, few enough registers at 4 warps.
TILE = 2048
# Widest block of one row; longer rows are cut into blocks of this size and summed through partials.
MAX_BLOCK = 1024
# Partial sums added per iteration of the reduction kernel.
REDUCE_BLOCK = 256
# Ints that change from run to run but never affect alignment: not specialised, so that they do not multiply
# the compiled variants (start and row_len stay specialised: their divisibility lets loads vectorise).
# Floats (lr, bias corrections) are runtime arguments: a new value never recompiles.
_NO_SPEC_FIRST = ("rows", "n_cblocks", "stats_stride", "stat_row")
_NO_SPEC_SECOND = ("rows", "n_cblocks", "stat_row", "slot")


# ---------------------------------------------------------------------------------------------- shared parts
@triton.jit
def _tile(start, rows, row_len, n_cblocks, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Row indices (ROWS,), element offsets and mask (ROWS, BLOCK), and this program's block of the row."""
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    r = (pid // n_cblocks).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    c = cb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = (r[:, None] < rows) & (c[None, :] < row_len)
    off = start + r[:, None] * row_len + c[None, :]
    return r, off, mask, cb


@triton.jit
def _add_stat(stats_ptr, k, stats_stride, stat_row, r, rmask, val):
    ptr = stats_ptr + k * stats_stride + stat_row + r
    old = tl.load(ptr, mask=rmask, other=0.0)
    tl.store(ptr, old + val.to(old.dtype), mask=rmask)


@triton.jit
def _put_sums(
    gp, gg, pp, pu, r, cb, rows, n_cblocks, stats_ptr, stats_stride, stat_row, part_ptr, DIRECT: tl.constexpr
):
    """This tile's row sums: added into stats when one block is the whole row (this program is then the only
    one touching those stats rows), else stored as partials [4, rows, n_cblocks] for _reduce_partials."""
    rmask = r < rows
    if DIRECT:
        _add_stat(stats_ptr, 0, stats_stride, stat_row, r, rmask, gp)
        _add_stat(stats_ptr, 1, stats_stride, stat_row, r, rmask, gg)
        _add_stat(stats_ptr, 2, stats_stride, stat_row, r, rmask, pp)
        _add_stat(stats_ptr, 3, stats_stride, stat_row, r, rmask, pu)
    else:
        at = r * n_cblocks + cb
        plane = rows * n_cblocks
        tl.store(part_ptr + at, gp, mask=rmask)
        tl.store(part_ptr + plane + at, gg, mask=rmask)
        tl.store(part_ptr + 2 * plane + at, pp, mask=rmask)
        tl.store(part_ptr + 3 * plane + at, pu, mask=rmask)


@triton.jit
def _row_sums(g, p, u, r, cb, rows, n_cblocks, stats_ptr, stats_stride, stat_row, part_ptr, DIRECT: tl.constexpr):
    """The tile's four row sums g.p, g.g, p.p, p.u, handed to _put_sums."""
    gp = tl.sum(g * p, axis=1)
    gg = tl.sum(g * g, axis=1)
    pp = tl.sum(p * p, axis=1)
    pu = tl.sum(p * u, axis=1)
    _put_sums(gp, gg, pp, pu, r, cb, rows, n_cblocks, stats_ptr, stats_stride, stat_row, part_ptr, DIRECT)


@triton.jit(do_not_specialize=_NO_SPEC_FIRST)
def _reduce_partials(part_ptr, rows, n_cblocks, stats_ptr, stats_stride, stat_row, BLOCK: tl.constexpr):
    """One program per (stat, row): the row's partial sums, in block order, added into stats."""
    pid = tl.program_id(0).to(tl.int64)
    k = pid // rows
    r = pid % rows
    base = part_ptr + pid * n_cblocks
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_cblocks, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        acc += tl.load(base + idx, mask=idx < n_cblocks, other=0.0)
    ptr = stats_ptr + k * stats_stride + stat_row + r
    old = tl.load(ptr)
    tl.store(ptr, old + tl.sum(acc, axis=0).to(old.dtype))


# ------------------------------------------------------------------------------------------------------ AdamP
@triton.jit(do_not_specialize=_NO_SPEC_FIRST)
def _adam_first(
    g_ptr, p_ptr, m_ptr, v_ptr, start, rows, row_len, n_cblocks,
    stats_ptr, stats_stride, stat_row, part_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps_s, step, decay, sign,
    NEST: tl.constexpr, FULL: tl.constexpr, DIRECT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # eps_s = eps * sqrt(1 - beta2^t) and step = lr / bc1 * sqrt(bc2): u is Adam's update / sqrt(bc2)
    r, off, mask, cb = _tile(start, rows, row_len, n_cblocks, ROWS, BLOCK)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32) * sign
    m = beta1 * tl.load(m_ptr + off, mask=mask, other=0.0) + one_minus_beta1 * g
    v = beta2 * tl.load(v_ptr + off, mask=mask, other=0.0) + one_minus_beta2 * g * g
    tl.store(m_ptr + off, m, mask=mask)
    tl.store(v_ptr + off, v, mask=mask)
    num = beta1 * m + one_minus_beta1 * g if NEST else m
    u = tl.where(mask, num / (tl.sqrt(v) + eps_s), 0.0)  # masked lanes stay 0 even with eps = 0
    p = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if FULL:
        tl.store(p_ptr + off, (p * decay - step * u).to(p_ptr.dtype.element_ty), mask=mask)
    else:
        _row_sums(g, p, u, r, cb, rows, n_cblocks, stats_ptr, stats_stride, stat_row, part_ptr, DIRECT)


@triton.jit(do_not_specialize=_NO_SPEC_SECOND)
def _adam_second(
    g_ptr, p_ptr, m_ptr, v_ptr, start, rows, row_len, n_cblocks, coef_ptr, stat_row, decay_ptr, slot,
    beta1, one_minus_beta1, eps_s, step, sign,
    NEST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    r, off, mask, cb = _tile(start, rows, row_len, n_cblocks, ROWS, BLOCK)
    coef = tl.load(coef_ptr + stat_row + r, mask=r < rows, other=0.0).to(tl.float32)
    d = tl.load(decay_ptr + slot).to(tl.float32)
    m = tl.load(m_ptr + off, mask=mask, other=0.0)
    v = tl.load(v_ptr + off, mask=mask, other=0.0)
    if NEST:
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32) * sign
        num = beta1 * m + one_minus_beta1 * g
    else:
        num = m
    u = num / (tl.sqrt(v) + eps_s)
    p = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
    # an unprojected row never multiplies the weight by its coefficient 0: Inf * 0 would turn an Inf weight NaN
    p_new = p * d - step * tl.where(coef[:, None] == 0.0, u, u - p * coef[:, None])
    tl.store(p_ptr + off, p_new.to(p_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------- SGDP
@triton.jit(do_not_specialize=_NO_SPEC_FIRST)
def _sgd_first(
    g_ptr, p_ptr, b_ptr, start, rows, row_len, n_cblocks, stats_ptr, stats_stride, stat_row, part_ptr,
    momentum, one_minus_dampening, lr, decay, sign,
    NEST: tl.constexpr, FULL: tl.constexpr, DIRECT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    r, off, mask, cb = _tile(start, rows, row_len, n_cblocks, ROWS, BLOCK)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32) * sign
    b = momentum * tl.load(b_ptr + off, mask=mask, other=0.0) + one_minus_dampening * g
    tl.store(b_ptr + off, b, mask=mask)
    u = g + momentum * b if NEST else b
    p = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if FULL:
        tl.store(p_ptr + off, (p * decay - lr * u).to(p_ptr.dtype.element_ty), mask=mask)
    else:
        _row_sums(g, p, u, r, cb, rows, n_cblocks, stats_ptr, stats_stride, stat_row, part_ptr, DIRECT)


@triton.jit(do_not_specialize=_NO_SPEC_SECOND)
def _sgd_second(
    g_ptr, p_ptr, b_ptr, start, rows, row_len, n_cblocks, coef_ptr, stat_row, decay_ptr, slot,
    momentum, lr, sign,
    NEST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    r, off, mask, cb = _tile(start, rows, row_len, n_cblocks, ROWS, BLOCK)
    coef = tl.load(coef_ptr + stat_row + r, mask=r < rows, other=0.0).to(tl.float32)
    d = tl.load(decay_ptr + slot).to(tl.float32)
    b = tl.load(b_ptr + off, mask=mask, other=0.0)
    if NEST:
        u = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32) * sign + momentum * b
    else:
        u = b
    p = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.where(coef[:, None] == 0.0, u, u - p * coef[:, None])  # as in _adam_second
    if not NEST:
        # the reference's quirk: without Nesterov the update is the buffer, projected in place
        tl.store(b_ptr + off, u, mask=mask & (coef != 0.0)[:, None])
    tl.store(p_ptr + off, (p * d - lr * u).to(p_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- launches
def _shape(rows: int, row_len: int, full: bool) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK, column blocks per row, programs) of a run."""
    if full:  # element-wise: the run is one long row, cut into TILE-wide blocks
        rows, row_len, widest = 1, rows * row_len, TILE
    else:
        widest = MAX_BLOCK
    block = min(triton.next_power_of_2(max(row_len, 1)), widest)
    tile_rows = min(max(TILE // block, 1), triton.next_power_of_2(rows))
    n_cblocks = triton.cdiv(row_len, block)
    return tile_rows, block, n_cblocks, triton.cdiv(rows, tile_rows) * n_cblocks


def _partials(rows: int, n_cblocks: int, device: torch.device) -> torch.Tensor:
    if n_cblocks == 1:
        return torch.empty(1, dtype=torch.float32, device=device)  # unused (DIRECT)
    return torch.empty(4 * rows * n_cblocks, dtype=torch.float32, device=device)


def _reduce(part: torch.Tensor, rows: int, n_cblocks: int, stats: torch.Tensor, stat_row: int) -> None:
    if n_cblocks > 1:
        _reduce_partials[(4 * rows,)](part, rows, n_cblocks, stats, stats.stride(0), stat_row, BLOCK=REDUCE_BLOCK)


def adam_first(tensors, start, rows, row_len, full, stats, stat_row, s, nesterov, maximize) -> None:
    """AdamP pass 1 on one run. ``tensors``: flat grad, param, exp_avg, exp_avg_sq; ``s``: the step's AdamScalars."""
    tile_rows, block, n_cblocks, programs = _shape(rows, row_len, full)
    if full:
        rows, row_len = 1, rows * row_len
    part = _partials(rows, n_cblocks, tensors[0].device) if not full else stats
    sqrt_bc2 = s.sqrt_bc2
    _adam_first[(programs,)](
        *tensors, start, rows, row_len, n_cblocks, stats, stats.stride(0), max(stat_row, 0), part,
        s.beta1, 1.0 - s.beta1, s.beta2, 1.0 - s.beta2, s.eps * sqrt_bc2,
        s.step_size * sqrt_bc2, s.decay, -1.0 if maximize else 1.0,
        NEST=nesterov, FULL=full, DIRECT=n_cblocks == 1, ROWS=tile_rows, BLOCK=block,
    )  # fmt: skip
    if not full:
        _reduce(part, rows, n_cblocks, stats, stat_row)


def adam_second(tensors, start, rows, row_len, coef, stat_row, decay, slot, s, nesterov, maximize) -> None:
    """AdamP pass 2 on one projectable run: coef (rows of stats) and decay (slots) stay on the device."""
    tile_rows, block, n_cblocks, programs = _shape(rows, row_len, False)
    sqrt_bc2 = s.sqrt_bc2
    _adam_second[(programs,)](
        *tensors, start, rows, row_len, n_cblocks, coef, stat_row, decay, slot,
        s.beta1, 1.0 - s.beta1, s.eps * sqrt_bc2, s.step_size * sqrt_bc2, -1.0 if maximize else 1.0,
        NEST=nesterov, ROWS=tile_rows, BLOCK=block,
    )  # fmt: skip


def sgd_first(tensors, start, rows, row_len, full, stats, stat_row, s, nesterov, maximize) -> None:
    """SGDP pass 1 on one run. ``tensors``: flat grad, param, momentum buffer; ``s``: the step's SgdScalars."""
    tile_rows, block, n_cblocks, programs = _shape(rows, row_len, full)
    if full:
        rows, row_len = 1, rows * row_len
    part = _partials(rows, n_cblocks, tensors[0].device) if not full else stats
    _sgd_first[(programs,)](
        *tensors, start, rows, row_len, n_cblocks, stats, stats.stride(0), max(stat_row, 0), part,
        s.momentum, 1.0 - s.dampening, s.lr, s.decay, -1.0 if maximize else 1.0,
        NEST=nesterov, FULL=full, DIRECT=n_cblocks == 1, ROWS=tile_rows, BLOCK=block,
    )  # fmt: skip
    if not full:
        _reduce(part, rows, n_cblocks, stats, stat_row)


def sgd_second(tensors, start, rows, row_len, coef, stat_row, decay, slot, s, nesterov, maximize) -> None:
    """SGDP pass 2 on one projectable run."""
    tile_rows, block, n_cblocks, programs = _shape(rows, row_len, False)
    _sgd_second[(programs,)](
        *tensors, start, rows, row_len, n_cblocks, coef, stat_row, decay, slot,
        s.momentum, s.lr, -1.0 if maximize else 1.0,
        NEST=nesterov, ROWS=tile_rows, BLOCK=block,
    )  # fmt: skip
