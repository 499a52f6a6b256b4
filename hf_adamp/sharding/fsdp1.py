"""FSDP1 (``FullyShardedDataParallel``): flat parameters, each rank holding one slice of the padded flat.

``_shard_param_infos`` says, per original parameter, which part of it (``intra_param_start_idx`` on,
``numel_in_shard`` elements) lies in this rank's shard and where (``offset_in_shard``).
- ``use_orig_params=False``: the optimizer is handed the 1-D ``FlatParameter`` itself.
- ``use_orig_params=True``: it is handed the original parameters, whose data are 1-D views of their
  part of the shard (size 0 where none).
One layout covers every flat parameter of the model: one all_reduce per step.

FSDP1 modules built after ``import hf_adamp`` are remembered (weakly), so that an optimizer meeting their
tensors without a layout finds its model and attaches itself (``find_fsdp1_model``): Trainer, Accelerate
and plain loops need no ``attach()`` call.
"""

from __future__ import annotations

import functools
import weakref
from types import ModuleType
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


_UNITS: weakref.WeakSet = weakref.WeakSet()  # every FSDP1 module built since the hook was installed
_MARK = "_hf_adamp_fsdp1_"


def track_fsdp1_units(fsdp_module: ModuleType) -> None:
    """Wrap ``FullyShardedDataParallel.__init__`` to remember each FSDP1 module (idempotent)."""
    fsdp_cls = fsdp_module.FullyShardedDataParallel
    original = fsdp_cls.__init__
    while getattr(original, _MARK, False):
        original = original.__wrapped__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _UNITS.add(self)

    setattr(__init__, _MARK, True)
    fsdp_cls.__init__ = __init__


def _unit_tensors(unit: Any) -> list[Tensor]:
    handle = getattr(unit, "_handle", None)
    flat = handle.flat_param if handle is not None else None
    if flat is None:
        return []
    return [flat, *(getattr(flat, "_params", None) or [])]


def find_fsdp1_model(optimizer: Any) -> torch.nn.Module | None:
    """The one outermost FSDP1 module whose flat parameters (or their original parameters) ``optimizer`` holds;
    None when there is none, or several."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    units = list(_UNITS)
    inner = {id(m) for unit in units for m in unit.modules() if m is not unit}
    models = [
        unit
        for unit in units
        if id(unit) not in inner and any(id(t) in held for m in unit.modules() for t in _unit_tensors(m))
    ]
    return models[0] if len(models) == 1 else None


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
