"""The AdamP/SGDP projection, written over per-row sums so that it shards.

For a parameter ``p`` with more than one dimension, gradient ``g`` and un-projected update ``u``
(Adam's ``m / denom`` or SGD's momentum buffer), the reference algorithm (Heo et al., 2021) is:

* channel view: ``R = p.shape[0]`` rows of ``K = numel / R`` elements; layer view: one row of ``numel``;
* per row, ``cos = |g.p| / (max(|g|, eps) * max(|p|, eps))``;
* if ``max(cos) < delta / sqrt(K)`` project every row: ``u_r -= p_r * (p_r.u_r) / (|p_r| + eps)**2``;
* else, if the layer-view cosine is ``< delta / sqrt(numel)``, project with the layer-view sums;
* a projected parameter gets its weight decay multiplied by ``wd_ratio``.

Everything is a function of four sums per row: ``g.p``, ``g.g``, ``p.p`` and ``p.u`` (rows of the layer
view are the sums of the channel rows). A step is therefore: accumulate the sums of every local piece
into one ``(4, rows)`` buffer, reduce it once across ranks if the parameter is sharded, decide from the
reduced sums with tensor ops only (no host sync), then apply a per-row coefficient. This module holds
that maths and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Rows of the statistics buffer.
GP, GG, PP, PU = 0, 1, 2, 3
NUM_STATS = 4

# Decision codes, as stored in ``Decision.kind``.
NONE, CHANNEL, LAYER = 0, 1, 2
DECISION_NAMES = {NONE: "none", CHANNEL: "channel", LAYER: "layer"}


def accumulate_row_sums(out: Tensor, g: Tensor, p: Tensor, u: Tensor, scratch: Tensor | None = None) -> None:
    """Add the four per-row sums of 2-D blocks ``g, p, u`` (rows, cols) into ``out`` (4, rows).

    ``scratch`` is an optional buffer of the blocks' shape and dtype, so large blocks need no temporary.
    """
    if g.dtype != out.dtype:  # products in the sums' dtype: fp32 ones overflow where the sums do not
        g, p, u, scratch = g.to(out.dtype), p.to(out.dtype), u.to(out.dtype), None
    prod = torch.empty_like(g) if scratch is None else scratch
    for row, (a, b) in ((GP, (g, p)), (GG, (g, g)), (PP, (p, p)), (PU, (p, u))):
        torch.mul(a, b, out=prod)
        out[row].add_(prod.sum(dim=1, dtype=out.dtype))


def write_row_sums(out: Tensor, g: Tensor, p: Tensor, u: Tensor, scratch: Tensor) -> None:
    """Write the four per-row sums of 2-D blocks ``g, p, u`` into ``out`` (4, rows): the fast path's form.

    Norms give g.g and p.p without a product pass; ``scratch`` (the blocks' shape) holds the products.
    Each buffer row is written by exactly one block per rank (a rank holds at most one piece of a row).
    Blocks narrower than the sums are widened first (fp32 products and norms overflow at |g| or |p| ~ 1e19).
    """
    if g.dtype != out.dtype:
        g, p, u = g.to(out.dtype), p.to(out.dtype), u.to(out.dtype)
        scratch = torch.empty_like(g)
    torch.sum(torch.mul(g, p, out=scratch), dim=1, dtype=out.dtype, out=out[GP])
    torch.linalg.vector_norm(g, dim=1, dtype=out.dtype, out=out[GG])
    torch.linalg.vector_norm(p, dim=1, dtype=out.dtype, out=out[PP])
    torch.sum(torch.mul(p, u, out=scratch), dim=1, dtype=out.dtype, out=out[PU])
    out[GG : PP + 1].square_()


def subtract_projection(u: Tensor, p: Tensor, coef: Tensor, scratch: Tensor | None = None) -> None:
    """``u -= p * coef`` row by row (``coef``: (rows,)), leaving rows whose coefficient is 0 (not projected)
    untouched: a non-finite weight must not turn its row's update into NaN there (Inf * 0), as in the reference.
    ``scratch`` is an optional buffer of ``p``'s shape and ``u``'s dtype."""
    c = coef[:, None]
    prod = torch.mul(p, c) if scratch is None else torch.mul(p, c, out=scratch)
    u.sub_(prod.masked_fill_(c == 0, 0))


@dataclass
class Decision:
    """What the projection does, per row of the statistics buffer and per parameter slot."""

    coef: Tensor  # (rows,): u_r -= p_r * coef_r; zero where nothing is projected
    projected: Tensor  # (slots,) bool: the parameter's weight decay is scaled by wd_ratio
    kind: Tensor  # (slots,) int8: NONE, CHANNEL or LAYER
    weight_norm: Tensor  # (slots,) |p| of the whole parameter before the step (global when reduced)


def decide(
    stats: Tensor,
    owner: Tensor,
    row_len: Tensor,
    numel: Tensor,
    delta: Tensor,
    eps: Tensor,
) -> Decision:
    """Take the projection decision for every parameter slot at once.

    ``stats`` is the (already reduced) (4, rows) buffer; ``owner`` (rows,) gives each row's slot;
    ``row_len``, ``numel``, ``delta`` and ``eps`` are (slots,) float tensors in ``stats``' dtype.
    Slots own contiguous, non-empty runs of rows.
    """
    slots = row_len.numel()
    eps_row = eps[owner]
    gp, gg, pp, pu = stats.unbind(0)

    p_norm = pp.sqrt()
    cos = gp.abs() / (gg.sqrt().clamp_min(eps_row) * p_norm.clamp_min(eps_row))
    cos_max = torch.full((slots,), -1.0, dtype=stats.dtype, device=stats.device)
    cos_max = cos_max.scatter_reduce(0, owner, cos, reduce="amax", include_self=True)
    channel = cos_max < delta / row_len.sqrt()

    layer_sums = torch.zeros((NUM_STATS, slots), dtype=stats.dtype, device=stats.device)
    layer_sums.index_add_(1, owner, stats)
    l_gp, l_gg, l_pp, l_pu = layer_sums.unbind(0)
    l_norm = l_pp.sqrt()
    layer_cos = l_gp.abs() / (l_gg.sqrt().clamp_min(eps) * l_norm.clamp_min(eps))
    layer = ~channel & (layer_cos < delta / numel.sqrt())

    channel_coef = pu / (p_norm + eps_row).square()
    layer_coef = (l_pu / (l_norm + eps).square())[owner]
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
    coef = torch.where(channel[owner], channel_coef, torch.where(layer[owner], layer_coef, zero))
    kind = channel.to(torch.int8) * CHANNEL + layer.to(torch.int8) * LAYER
    return Decision(coef=coef, projected=channel | layer, kind=kind, weight_norm=l_norm)


def channel_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of AdamP's channel view, or (0, 0) for a parameter it never projects."""
    if len(shape) <= 1:
        return 0, 0
    rows = shape[0]
    return rows, (math.prod(shape) // rows if rows else 0)
