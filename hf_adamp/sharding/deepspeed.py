"""DeepSpeed ZeRO: layouts of the flat fp32 partitions that ZeRO hands the client optimizer.

ZeRO-1/2 (``stage_1_and_2.py``): each client group becomes one 1-D fp32 partition
``single_partition_of_fp32_groups[i]``, the slice ``[rank * partition_size, (rank + 1) * partition_size)`` of
the group's parameters concatenated in ``round_robin_bit16_groups`` order at ``round_robin_bit16_offsets``
(alignment gaps between them, padding at the end). Parameters straddle ranks.

ZeRO-3 (``stage3.py``): each parameter is cut into ``world`` partitions of ``ceil(numel / world)`` elements
(``ds_tensor``); ``fp32_partitioned_groups_flat[s]`` concatenates this rank's partitions of the parameters
of sub-group ``s``, the last rank's ones padded with uninitialised memory.

Both call ``step()`` once per group / sub-group with only that partition in ``param_groups``, so there is
one layout per step call, listing every parameter of that group / sub-group (the same on every rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .layout import Layout, ParamSpec, Piece


def flat_pieces(offsets: list[int], numels: list[int], start: int, length: int) -> list[Piece]:
    """Pieces of parameters stored at ``offsets`` of a flat buffer that fall in ``[start, start + length)``."""
    pieces = []
    for j, (off, n) in enumerate(zip(offsets, numels, strict=True)):
        lo, hi = max(start, off), min(start + length, off + n)
        if lo < hi:
            pieces.append(Piece(j, lo - start, lo - off, hi - lo))
    return pieces


def zero12_layouts(zero_opt: Any, names: dict[int, str]) -> list[Layout]:
    """One layout per group of a ``DeepSpeedZeroOptimizer`` (ZeRO-1/2)."""
    layouts = []
    for i, partition in enumerate(zero_opt.single_partition_of_fp32_groups):
        rank = dist.get_rank(group=zero_opt.real_dp_process_group[i])
        params = zero_opt.round_robin_bit16_groups[i]
        # shapes from the meta copies: param.data may be swapped out by state offloading
        metas = getattr(zero_opt, "round_robin_bit16_meta", [params] * (i + 1))[i]
        specs = [
            ParamSpec(tuple(m.shape), names.get(id(p)) or f"group{i}.param{j}")
            for j, (p, m) in enumerate(zip(params, metas, strict=True))
        ]
        size = int(zero_opt.partition_size[i])
        if partition.numel() != size:
            raise RuntimeError(f"hf_adamp: ZeRO partition {i} has {partition.numel()} elements, expected {size}")
        pieces = flat_pieces(list(zero_opt.round_robin_bit16_offsets[i]), [s.numel for s in specs], rank * size, size)
        layouts.append(Layout(specs, {id(partition): pieces}))
    return layouts


def zero3_layouts(zero_opt: Any, names: dict[int, str]) -> list[Layout]:
    """One layout per sub-group of a ``DeepSpeedZeroOptimizer_Stage3``."""
    layouts = []
    for s, flat in enumerate(zero_opt.fp32_partitioned_groups_flat):
        params = zero_opt.fp16_groups[s]
        rank = dist.get_rank(group=zero_opt.sub_group_process_groups[s])
        specs, pieces, local = [], [], 0
        for j, p in enumerate(params):
            specs.append(ParamSpec(tuple(p.ds_shape), names.get(id(p)) or f"subgroup{s}.param{j}"))
            part = int(p.partition_numel())
            n = max(0, min(part, int(p.ds_numel) - rank * part))  # the rest of the partition is padding
            if n:
                pieces.append(Piece(j, local, rank * part, n))
            local += part
        if flat.numel() != local:
            raise RuntimeError(f"hf_adamp: ZeRO-3 sub-group {s} has {flat.numel()} elements, expected {local}")
        layouts.append(Layout(specs, {id(flat): pieces}))
    return layouts


def is_zero_optimizer(obj: Any) -> bool:
    return hasattr(obj, "single_partition_of_fp32_groups") or hasattr(obj, "fp32_partitioned_groups_flat")


def holds_full_copies(obj: Any) -> bool:
    """DeepSpeed's FP16_UnfusedOptimizer (ZeRO stage 0 with fp16 or bf16): it replaces each parameter in the
    client optimizer's groups by a full-shape fp32 copy (``fp32_groups``), no flattening, no partitioning."""
    return type(obj).__name__ == "FP16_UnfusedOptimizer" and hasattr(obj, "fp32_groups") and hasattr(obj, "fp16_groups")


def full_copies_of(wrapper: Any, optimizer: Any) -> bool:
    """The optimizer's tensors are the wrapper's fp32 copies, with the shapes of the parameters they copy."""
    copies = [p for group in optimizer.param_groups for p in group["params"]]
    originals = [p for group in wrapper.fp16_groups for p in group]
    known = {id(p) for group in wrapper.fp32_groups for p in group}
    return len(copies) == len(originals) and all(
        id(c) in known and c.shape == o.shape for c, o in zip(copies, originals, strict=True)
    )


def attach_deepspeed(engine_or_zero_opt: Any, optimizer: Any | None = None) -> list[Layout]:
    """Attach layouts and the all_reduce to the client optimizer wrapped by a DeepSpeed engine.

    Returns the layouts (empty for ZeRO-0, where the optimizer holds the parameters themselves).
    """
    # the ZeRO-3 optimizer has a .module too: tell them apart by the ZeRO partitions
    engine = None if is_zero_optimizer(engine_or_zero_opt) else engine_or_zero_opt
    zero_opt = engine.optimizer if engine is not None else engine_or_zero_opt
    client = getattr(zero_opt, "optimizer", None)
    if optimizer is None:
        optimizer = client
    elif is_zero_optimizer(zero_opt) and client is not optimizer:
        raise ValueError("hf_adamp.sharding.attach: the optimizer is not the one this DeepSpeed engine wraps")
    if not hasattr(optimizer, "attach_layout"):
        raise TypeError(
            f"hf_adamp.sharding.attach: {type(optimizer).__name__} is not an hf_adamp projected optimizer "
            "(AdamP, SGDP); nothing to attach"
        )
    module = engine.module if engine is not None else None
    names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
    # ZeRO keeps the names too (param -> name), so a ZeRO optimizer alone is enough
    names.update({id(p): n for p, n in getattr(zero_opt, "param_names", {}).items() if id(p) not in names})
    if hasattr(zero_opt, "single_partition_of_fp32_groups"):
        layouts = zero12_layouts(zero_opt, names)
    elif hasattr(zero_opt, "fp32_partitioned_groups_flat"):
        layouts = zero3_layouts(zero_opt, names)
    else:
        optimizer.attach_layout(None)
        return []
    group = zero_opt.dp_process_group

    def reducer(stats: torch.Tensor) -> None:
        dist.all_reduce(stats, group=group)

    optimizer.attach_layout(layouts, reducer)
    return layouts
