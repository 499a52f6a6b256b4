"""FSDP2 (``torch.distributed.fsdp.fully_shard``): every parameter a DTensor sharded on dim 0.

Rows are split as ``torch.chunk`` does (7 rows on 2 ranks: 4 + 3; 1 row: 1 + 0, an empty shard), so a
rank holds whole rows of the channel view; layer sums still need the reduction. The layout is keyed by
the DTensor parameters themselves: the core steps their ``to_local()`` shards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .detect import is_dtensor
from .layout import Layout, ParamSpec, Piece


def _shard0_rows(p: Tensor) -> tuple[int, int]:
    """(first row, row count) of this rank's shard of a DTensor sharded as Shard(0) on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(
            f"hf_adamp: only FSDP2 Shard(0) on a 1-D mesh is supported, got placements {placements} on a "
            f"{mesh.ndim}-D mesh (HSDP and tensor parallel are not)"
        )
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = p.shape[0]
    chunk = -(-rows // world)
    start = min(rows, rank * chunk)
    count = max(0, min(chunk, rows - start))
    local_rows = p.to_local().shape[0]
    if local_rows != count:
        raise RuntimeError(f"hf_adamp: shard of {tuple(p.shape)} has {local_rows} rows, expected {count}")
    return start, count


def fsdp2_layout(optimizer: Any, model: torch.nn.Module | None = None) -> tuple[Layout, Any]:
    """The layout of all parameters in ``optimizer.param_groups`` (DTensors), and their process group."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    specs: list[ParamSpec] = []
    pieces: dict[int, list[Piece]] = {}
    group = None
    for param_group in optimizer.param_groups:
        for p in param_group["params"]:
            if not is_dtensor(p):
                raise NotImplementedError(
                    f"hf_adamp: parameter {names.get(id(p), tuple(p.shape))} is not sharded by FSDP2; mixing "
                    "replicated and sharded parameters in one optimizer is not supported"
                )
            if p.dim() == 0:
                raise NotImplementedError("hf_adamp: 0-dim FSDP2 parameters are not supported")
            start, count = _shard0_rows(p)
            row_len = p.numel() // p.shape[0] if p.shape[0] else 0
            j = len(specs)
            specs.append(ParamSpec(tuple(p.shape), names.get(id(p)) or f"param{j}"))
            pieces[id(p)] = [Piece(j, 0, start * row_len, count * row_len)] if count * row_len else []
            pg = p.device_mesh.get_group()
            if group is not None and pg is not group:
                raise NotImplementedError("hf_adamp: parameters sharded over different process groups")
            group = pg
    return Layout(specs, pieces), group


def attach_fsdp2(model: torch.nn.Module | None, optimizer: Any) -> list[Layout]:
    layout, group = fsdp2_layout(optimizer, model)

    def reducer(stats: Tensor) -> None:
        dist.all_reduce(stats, group=group)

    optimizer.attach_layout(layout, reducer)
    return [layout]


def has_dtensors(optimizer: Any) -> bool:
    return any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"])
