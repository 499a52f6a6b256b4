"""FSDP1 ranks for tests/test_sharding_fsdp1.py (spawned; must be importable by reference)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from _sharding_models import LR, MICRO, STEPS, batch, make_model, param_groups
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn import functional as F

import hf_adamp
import hf_adamp.sharding
import hf_adamp.sharding.fsdp1
from hf_adamp.integrations.deepspeed import innermost_optimizer


def train(
    rank: int, world: int, use_orig_params: bool, attach: bool = True, forget: bool = False, accelerate: bool = False
) -> dict:
    """``attach=False``: the optimizer finds the FSDP1 model itself at its first step; ``forget``: as if the model
    had been built before ``import hf_adamp`` (unknown to it); ``accelerate``: step through Accelerate's wrapper."""
    base = make_model()
    names = [n for n, _ in base.named_parameters()]
    policy = ModuleWrapPolicy({torch.nn.Linear})
    model = FSDP(base, device_id=torch.device("cpu"), use_orig_params=use_orig_params, auto_wrap_policy=policy)
    if forget:
        for unit in model.modules():
            hf_adamp.sharding.fsdp1._UNITS.discard(unit)
    if use_orig_params:  # the user's decay groups survive, on the original (now 1-D shard) parameters
        groups = param_groups(model.module)
    else:
        groups = [dict(params=list(model.parameters()), weight_decay=0.1)]
    optimizer = hf_adamp.AdamP(groups, lr=LR)
    if attach:
        hf_adamp.sharding.attach(model, optimizer)
    if accelerate:  # on CPU Accelerate does not run FSDP itself (it falls back to DDP): wrap the optimizer only
        from accelerate import Accelerator

        optimizer = Accelerator(cpu=True).prepare_optimizer(optimizer)
    decisions: dict[str, set[str]] = {}
    for step in range(STEPS):
        x, y = batch(step, world)
        x, y = x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        for name, kind in innermost_optimizer(optimizer).projection_decisions().items():
            decisions.setdefault(name, set()).add(kind)
    with FSDP.summon_full_params(model):
        params = {n: p.detach().clone() for n, p in zip(names, model.module.parameters(), strict=True)}
    return dict(params=params, decisions=decisions)


def run_all(rank: int, world: int, configs: dict[str, dict]) -> dict[str, dict]:
    dist.init_process_group("gloo")
    out = {}
    try:
        for key, kw in configs.items():
            try:
                out[key] = train(rank, world, **kw)
            except Exception as e:  # noqa: BLE001 - the test inspects the message
                out[key] = dict(error=f"{type(e).__name__}: {e}")
                dist.barrier()
    finally:
        dist.destroy_process_group()
    return out
