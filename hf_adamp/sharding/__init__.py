"""Mapping sharded tensors back to parameter rows, so the projection stays exact under sharding.

Raw ``deepspeed.initialize`` users make one call after it::

    engine, *_ = deepspeed.initialize(model=model, optimizer=hf_adamp.AdamP(...), config=...)
    hf_adamp.sharding.attach(engine)

Without it, AdamP/SGDP raise on their first step instead of silently acting as AdamW.
"""

from __future__ import annotations

from typing import Any

import torch

from .deepspeed import attach_deepspeed, is_zero_optimizer
from .fsdp import attach_fsdp2, has_dtensors
from .fsdp1 import attach_fsdp1
from .layout import Layout, ParamSpec, Piece, Segment


def attach(engine_or_model: Any, optimizer: Any | None = None) -> list[Layout]:
    """Tell an hf_adamp optimizer how the engine shards the parameters, and how to reduce across ranks.

    ``engine_or_model``: a DeepSpeed engine (or its ZeRO optimizer), a model sharded with FSDP2
    ``fully_shard``, the root ``FullyShardedDataParallel`` module (FSDP1), or plain / DDP (nothing to
    map). ``optimizer``: the hf_adamp optimizer; found from a DeepSpeed engine when omitted, required
    otherwise. Call it again after the engine rebuilds its partitions.
    Returns the attached layouts (none for unsharded setups such as DDP or ZeRO-0).
    """
    engine_opt = getattr(engine_or_model, "optimizer", None)
    if is_zero_optimizer(engine_or_model) or is_zero_optimizer(engine_opt) or _is_deepspeed_engine(engine_or_model):
        return attach_deepspeed(engine_or_model, optimizer)
    if optimizer is not None and has_dtensors(optimizer):
        return attach_fsdp2(engine_or_model, optimizer)
    if optimizer is not None and _is_fsdp1(engine_or_model):
        return attach_fsdp1(engine_or_model, optimizer)
    if optimizer is not None and isinstance(engine_or_model, torch.nn.Module) and not _is_fsdp1(engine_or_model):
        optimizer.attach_layout(None)  # plain or DDP: the optimizer holds the parameters themselves
        return []
    raise TypeError(
        f"hf_adamp.sharding.attach: don't know how {type(engine_or_model).__name__} shards parameters "
        "(supported: DeepSpeed engines / ZeRO optimizers, FSDP2 and FSDP1 models, plain and DDP models)"
    )


def _is_fsdp1(obj: Any) -> bool:
    return any(c.__name__ == "FullyShardedDataParallel" for c in type(obj).__mro__)


def _is_deepspeed_engine(obj: Any) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(obj).__mro__)


__all__ = ["Layout", "ParamSpec", "Piece", "Segment", "attach"]
