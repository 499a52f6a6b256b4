"""The layout machinery of the core, without any engine: shards emulated in one process.

Each "rank" is a thread holding flat local tensors cut out of the concatenated parameters at arbitrary
points (inside rows, across parameter boundaries, with alignment gaps and padding that hold garbage, and
a rank holding nothing). The reducer sums the ranks' statistics buffers, in rank order, behind a barrier:
a real all_reduce in miniature. The result must equal single-process ``adamp.AdamP`` / ``adamp.SGDP``.
"""

from __future__ import annotations

import dataclasses
import threading

import adamp
import pytest
import torch

import hf_adamp
from hf_adamp import kernels
from hf_adamp.optim.backends import eager
from hf_adamp.sharding import Layout, ParamSpec, Piece

GARBAGE = 1e28  # what DeepSpeed ZeRO-3 padding was seen to hold

# (shape, group): group 0 decays, group 1 does not (two flat partitions, as DeepSpeed builds them)
SHAPES = [((5, 7), 0), ((3, 4, 2), 0), ((7,), 1), ((1, 6), 0), ((6, 1), 0), ((4, 3), 1), ((2, 1, 3, 3), 0), ((3,), 1)]
KINDS = ("channel", "layer", "none")


class ThreadAllReduce:
    """Sum of the ranks' buffers, identical on every rank; counts the calls (one per step per rank)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.bufs: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world
        self.sizes: list[list[int]] = [[] for _ in range(world)]

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> None:
            self.calls[rank] += 1
            self.sizes[rank].append(t.numel())
            self.bufs[rank] = t.clone()
            self.barrier.wait()
            total = self.bufs[0].clone()
            for other in self.bufs[1:]:
                total += other
            self.barrier.wait()
            t.copy_(total)

        return reduce


def run_ranks(fns) -> None:
    errors: list[BaseException] = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank hung (collective mismatch)"
    if errors:
        raise errors[0]


def designed_grad(p: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A gradient that makes the reference decide ``kind`` (for 1-row parameters layer == channel)."""
    P = p.reshape(p.shape[0], -1) if p.dim() > 1 else p.reshape(1, -1)
    H = torch.randn(P.shape, generator=gen, dtype=p.dtype)
    if p.dim() <= 1 or kind == "none":
        G = 0.5 * P + 0.1 * H if kind == "none" else H
    elif kind == "channel":  # orthogonal to every row of p
        G = H - P * (P * H).sum(1, keepdim=True) / (P * P).sum(1, keepdim=True)
    else:  # rows strongly (anti-)aligned with p, the whole orthogonal to p
        signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(P.shape[0])], dtype=p.dtype)
        H = 3 * signs[:, None] * P + 0.1 * H
        G = H - P * (P * H).sum() / (P * P).sum()
    return G.reshape(p.shape).clone()


def build_shards(full: list[torch.Tensor], idx: list[int], cuts: list[float], gaps: bool):
    """Concatenate parameters ``idx`` (with 1-2 garbage elements between them when ``gaps``), cut at the
    fractions ``cuts``; returns per rank (local tensor, pieces, [(local, global) ranges]) and total length."""
    offsets, pos = [], 0
    for k, j in enumerate(idx):
        offsets.append(pos)
        pos += full[j].numel() + ((1 + k % 2) if gaps else 0)
    total = pos
    bounds = [0] + [int(round(c * total)) for c in cuts] + [total]
    shards = []
    for r in range(len(bounds) - 1):
        a, b = bounds[r], bounds[r + 1]
        tail = 3 if gaps else 0  # alignment padding at the end of the partition
        local = torch.full((b - a + tail,), GARBAGE, dtype=full[0].dtype)
        pieces, ranges = [], []
        for j, off in zip(idx, offsets, strict=True):
            lo, hi = max(a, off), min(b, off + full[j].numel())
            if lo < hi:
                pieces.append(Piece(j, lo - a, lo - off, hi - lo))
                ranges.append((j, lo - a, lo - off, hi - lo))
        shards.append((local, pieces, ranges))
    return shards


def gather(shards_by_group, full_like: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [torch.full_like(t, float("nan")) for t in full_like]
    for shards in shards_by_group:
        for local, _, ranges in shards:
            for j, ls, ps, n in ranges:
                out[j].view(-1)[ps : ps + n] = local[ls : ls + n]
    return out


CUTS = {
    "mid-rows": [0.37, 0.71],
    "empty-middle-rank": [0.5, 0.5],
    "empty-last-rank": [0.43, 1.0],
    "one-rank-all": [0.0, 1.0],
}


@pytest.mark.parametrize("cuts", list(CUTS), ids=list(CUTS))
@pytest.mark.parametrize(
    "opt",
    ["adamp", "adamp-nesterov-plain", "sgdp", "sgdp-nesterov-plain", "adamp-chunked"],
)
def test_sharded_equals_single_process(opt: str, cuts: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if opt == "adamp-chunked":  # tiny chunks of the eager path: segments split inside pieces, many partial rows
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
        monkeypatch.setattr(eager, "CHUNK_ELEMS", 5)
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape, _ in SHAPES]
    names = [f"p{j}" for j in range(len(full))]
    group_idx = [[j for j, (_, g) in enumerate(SHAPES) if g == gi] for gi in (0, 1)]
    nesterov = "nesterov" in opt
    foreach = False if "plain" in opt else None
    hyper = [dict(weight_decay=0.1), dict(weight_decay=0.0)]

    def make(cls_ref: bool, groups):
        if opt.startswith("adamp"):
            cls = adamp.AdamP if cls_ref else hf_adamp.AdamP
            kw = dict(lr=0.01, betas=(0.8, 0.9), nesterov=nesterov)
        else:
            cls = adamp.SGDP if cls_ref else hf_adamp.SGDP
            kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov)
        if not cls_ref:
            kw["foreach"] = foreach
        return cls(groups, **kw)

    ref_params = [t.clone().requires_grad_() for t in full]
    ref = make(True, [dict(params=[ref_params[j] for j in group_idx[g]], **hyper[g]) for g in (0, 1)])

    world = 3
    shards_by_group = [build_shards(full, group_idx[g], CUTS[cuts], gaps=True) for g in (0, 1)]
    for shards in shards_by_group:
        for local, _, ranges in shards:
            for j, ls, ps, n in ranges:
                local[ls : ls + n] = full[j].view(-1)[ps : ps + n]
    reducer = ThreadAllReduce(world)
    opts = []
    for r in range(world):
        locals_r = [shards_by_group[g][r][0] for g in (0, 1)]
        o = make(False, [dict(params=[locals_r[g]], **hyper[g]) for g in (0, 1)])
        layouts = []
        for g in (0, 1):  # one layout per group, listing every parameter of the group (DeepSpeed's way)
            specs = [ParamSpec(tuple(full[j].shape), names[j]) for j in group_idx[g]]
            pieces = [dataclasses.replace(pc, param=group_idx[g].index(pc.param)) for pc in shards_by_group[g][r][1]]
            layouts.append(Layout(specs, {id(locals_r[g]): pieces}))
        o.attach_layout(layouts, reducer.for_rank(r))
        opts.append(o)
    padding_before = [[s[0].clone() for s in shards] for shards in shards_by_group]

    seen: set[str] = set()
    for step in range(9):
        grads = [designed_grad(ref_params[j].detach(), KINDS[(step + j) % 3], gen) for j in range(len(full))]
        for p, g in zip(ref_params, grads, strict=True):
            p.grad = g.clone()
        ref.step()
        for g_i, shards in enumerate(shards_by_group):
            for r, (local, _, ranges) in enumerate(shards):
                grad = torch.full_like(local, GARBAGE)
                for j, ls, ps, n in ranges:
                    grad[ls : ls + n] = grads[j].view(-1)[ps : ps + n]
                local.grad = grad
                if r == 1 and cuts == "empty-middle-rank" and g_i == 0:
                    local.grad = None  # an empty shard without a gradient must still join the reduce

        for g_i in (0, 1):  # DeepSpeed's way: step() once per group, param_groups narrowed to it

            def step_rank(o, g_i) -> None:
                saved = o.param_groups
                o.param_groups = [saved[g_i]]
                o.step()
                o.param_groups = saved

            run_ranks([lambda o=o, g_i=g_i: step_rank(o, g_i) for o in opts])
            if g_i == 0:
                seen |= {v for k, v in opts[0].projection_decisions().items() if int(k[1:]) in group_idx[0]}

    got = gather(shards_by_group, full)
    worst = 0.0
    for j, (a, b) in enumerate(zip(got, ref_params, strict=True)):
        err = ((a - b.detach()).abs().max() / b.detach().abs().max()).item()
        assert err < 1e-13, f"{names[j]} {tuple(a.shape)}: rel err {err:.2e}"
        worst = max(worst, err)
    print(f"{opt} {cuts}: max rel err {worst:.1e}")
    assert seen == {"channel", "layer", "none"}, seen
    # one collective per step() call on every rank, same size everywhere
    assert all(c == reducer.calls[0] for c in reducer.calls) and reducer.calls[0] == 9 * 2
    assert all(s == reducer.sizes[0] for s in reducer.sizes)
    # elements outside every piece (alignment gaps, partition padding) are never touched
    for g_i, shards in enumerate(shards_by_group):
        for r, (local, _, ranges) in enumerate(shards):
            covered = torch.zeros(local.numel(), dtype=torch.bool)
            for _, ls, _, n in ranges:
                covered[ls : ls + n] = True
            if foreach is not False:  # the plain path (foreach=False) updates whole tensors, padding included
                assert torch.equal(local[~covered], padding_before[g_i][r][~covered]), (opt, r)


def test_layout_sizes_stats_by_every_parameter() -> None:
    specs = [ParamSpec((5, 7)), ParamSpec((7,)), ParamSpec((2, 3, 3))]
    lay = Layout(specs, {})
    assert lay.total_rows == 5 + 0 + 2
    assert lay.stat_offsets == [0, 5, 5]
