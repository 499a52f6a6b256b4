"""FSDP1 (``FullyShardedDataParallel``): flat parameters, each rank holding one slice of the padded flat.

``_shard_param_infos`` says, per original parameter, which part of it (``intra_param_start_idx`` on,
``numel_in_shard`` elements) lies in this rank's shard and where (``offset_in_shard``).
- ``use_orig_params=False``: the optimizer is handed the 1-D ``FlatParameter`` itself.
- ``use_orig_params=True``: it is handed the original parameters, whose data are 1-D views of their
  part of the shard (size 0 where none).
One layout covers every flat parameter of the model: one all_reduce per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import Layout, ParamSpec, Piece


def _handles(model: torch.nn.Module) -> list[tuple[str, Any, Any]]:
    """(name prefix in the user's model, FSDP unit, its flat-parameter handle) for every unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = []
    for name, module in model.named_modules():
        handle = getattr(module, "_handle", None) if isinstance(module, FSDP) else None
        if handle is not None and handle.flat_param is not None:
            prefix = ".".join(t for t in name.split(".") if t != "_fsdp_wrapped_module")
            out.append((prefix + "." if prefix else "", module, handle))
    return out


def is_fsdp1(model: Any) -> bool:
    return any(c.__name__ == "FullyShardedDataParallel" for c in type(model).__mro__)


def attach_fsdp1(model: torch.nn.Module, optimizer: Any) -> list[Layout]:
    specs: list[ParamSpec] = []
    pieces: dict[int, list[Piece]] = {}
    group = None
    for prefix, module, handle in _handles(model):
        flat = handle.flat_param
        # use_orig_params=True: the optimizer holds the original parameters, views of their shard part
        orig = list(flat._params) if getattr(flat, "_params", None) is not None else None
        base = len(specs)
        specs += [ParamSpec(tuple(shape), prefix + fqn) for fqn, shape in zip(flat._fqns, flat._shapes, strict=True)]
        flat_pieces = []
        for k, info in enumerate(flat._shard_param_infos):
            n = info.numel_in_shard if info.in_shard else 0
            if orig is not None:
                pieces[id(orig[k])] = [Piece(base + k, 0, info.intra_param_start_idx, n)] if n else []
            elif n:
                flat_pieces.append(Piece(base + k, info.offset_in_shard, info.intra_param_start_idx, n))
        if orig is None:
            pieces[id(flat)] = flat_pieces
        pg = module.process_group
        if group is not None and pg is not group:
            raise NotImplementedError("hf_adamp: FSDP1 units over different process groups (HSDP)")
        group = pg
    layout = Layout(specs, pieces)

    def reducer(stats: Tensor) -> None:
        dist.all_reduce(stats, group=group)

    optimizer.attach_layout(layout, reducer)
    return [layout]
