"""FSDP2 ranks for tests/test_sharding_fsdp.py (spawned; must be importable by reference)."""

from __future__ import annotations

import adamp
import torch.distributed as dist
from _sharding_models import LR, MICRO, STEPS, batch, make_model, param_groups, param_groups_names
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

import hf_adamp
import hf_adamp.sharding


def train(rank: int, world: int, opt: str, attach: bool = True) -> dict:
    model = make_model()
    for module in (model.fc1, model.fc2, model.fc3, model.gate):
        fully_shard(module)
    fully_shard(model)
    if opt == "ours":
        optimizer = hf_adamp.AdamP(param_groups(model), lr=LR)
        if attach:
            hf_adamp.sharding.attach(model, optimizer)
    else:
        optimizer = adamp.AdamP(param_groups(model), lr=LR)
    decisions: dict[str, set[str]] = {}
    # attached automatically, the layout has no model at hand: keys are param0, param1... in group order
    by_position = {f"param{j}": n for j, n in enumerate(n for g in param_groups_names(model) for n in g)}
    local_rows = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
    for step in range(STEPS):
        x, y = batch(step, world)
        x, y = x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        if opt == "ours":
            for name, kind in optimizer.projection_decisions().items():
                decisions.setdefault(by_position.get(name, name), set()).add(kind)
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return dict(params=params, decisions=decisions, local_rows=local_rows)


def run_all(rank: int, world: int, configs: dict[str, dict]) -> dict[str, dict]:
    dist.init_process_group("gloo")
    out = {}
    try:
        for key, kw in configs.items():
            try:
                out[key] = train(rank, world, **kw)
            except Exception as e:  # noqa: BLE001 - the test inspects the message
                out[key] = dict(error=f"{type(e).__name__}: {e}")
                dist.barrier()  # both ranks fail at the same point; resynchronise before the next run
    finally:
        dist.destroy_process_group()
    return out


def nan_gradient_element(rank: int, world: int) -> dict:
    """AdamP under FSDP2 for STEPS steps, with one NaN element in fc1's gradient (rank 0's shard) at the last step,
    after channel-projected steps (so the fused kernels speculate "channel"). Returns the NaN counts of the full
    weight and first moment."""
    dist.init_process_group("gloo")
    try:
        model = make_model()
        for module in (model.fc1, model.fc2, model.fc3, model.gate):
            fully_shard(module)
        fully_shard(model)
        optimizer = hf_adamp.AdamP(param_groups(model), lr=LR)
        for step in range(STEPS):
            x, y = batch(step, world)
            x, y = x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            if step == STEPS - 1 and rank == 0:
                model.fc1.weight.grad.to_local()[2, 3] = float("nan")
            optimizer.step()
        weight = model.fc1.weight
        out = dict(
            nan_weights=int(weight.full_tensor().isnan().sum()),
            nan_exp_avg=int(optimizer.state[weight]["exp_avg"].full_tensor().isnan().sum()),
            speculated=any(v for v in optimizer.state[weight].get("last_projection", [])),
        )
    finally:
        dist.destroy_process_group()
    return out
