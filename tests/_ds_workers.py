"""DeepSpeed ranks for tests/test_sharding_deepspeed.py (spawned; must be importable by reference)."""

from __future__ import annotations

import operator

import adamp
import torch
from _sharding_models import LR, MICRO, STEPS, batch, make_model, param_groups
from torch.nn import functional as F

import hf_adamp
import hf_adamp.sharding


def zero_config(stage: int, round_robin: bool = False, sub_group_size: int | None = None, offload=False) -> dict:
    zero: dict = {"stage": stage}
    if offload:  # ZeRO-Offload with the client optimizer (DeepSpeed refuses it unless told not to force its own)
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage in (1, 2):
        zero["round_robin_gradients"] = round_robin
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
        if sub_group_size:
            zero["sub_group_size"] = sub_group_size
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0: not what the reference does
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "zero_force_ds_cpu_optimizer": False,
    }


def full_params(engine, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def train(
    rank: int, world: int, stage: int, opt: str, round_robin=False, sub_group_size=None, attach=True, offload=False
):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = make_model()
    if opt == "ours":
        optimizer = hf_adamp.AdamP(param_groups(model), lr=LR)
    else:
        optimizer = adamp.AdamP(param_groups(model), lr=LR)
    cfg = zero_config(stage, round_robin, sub_group_size, offload)
    engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    offloaded = bool(getattr(zero_opt, "cpu_offload", False) or getattr(zero_opt, "offload_optimizer", False))
    layouts = hf_adamp.sharding.attach(engine, optimizer) if (attach and opt == "ours") else []
    decisions: dict[str, set[str]] = {}
    contexts = []  # the optimizer's step contexts after the second step
    reused = True  # and every later step ran on them (none rebuilt)
    for step in range(STEPS):
        x, y = batch(step, world)
        x, y = x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]
        loss = F.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        if opt == "ours":
            for name, kind in optimizer.projection_decisions().items():
                decisions.setdefault(name, set()).add(kind)
            now = list(optimizer._contexts.values())
            if step == 1:
                contexts = now
            elif step > 1:
                reused = reused and len(now) == len(contexts) and all(map(operator.is_, now, contexts))
    if not attach and opt == "ours":  # attached automatically on the first step
        layouts = optimizer._layouts
    return dict(
        params=full_params(engine, stage),
        decisions=decisions,
        n_layouts=len(layouts),
        offloaded=offloaded,
        total_rows=[lay.total_rows for lay in layouts],
        contexts=len(contexts),
        contexts_reused=reused,
    )


def resume(rank: int, world: int, stage: int, ckpt_dir: str, split: int = STEPS // 2) -> dict:
    """Train STEPS straight, and again with save_checkpoint after ``split`` steps and a fresh engine that
    load_checkpoint()s and finishes: both must give the same bits."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)

    def fresh():
        model = make_model()
        optimizer = hf_adamp.AdamP(param_groups(model), lr=LR)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero_config(stage))
        hf_adamp.sharding.attach(engine)
        return engine, optimizer

    def run(engine, steps):
        for step in steps:
            x, y = batch(step, world)
            x, y = x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]
            engine.backward(F.mse_loss(engine(x), y))
            engine.step()

    engine, _ = fresh()
    run(engine, range(STEPS))
    straight = full_params(engine, stage)

    engine, _ = fresh()
    run(engine, range(split))
    engine.save_checkpoint(ckpt_dir, tag="mid")
    engine, optimizer = fresh()
    engine.load_checkpoint(ckpt_dir, tag="mid")
    state_keys = sorted({k for st in optimizer.state.values() for k in st})
    run(engine, range(split, STEPS))
    resumed = full_params(engine, stage)
    return dict(straight=straight, resumed=resumed, state_keys=state_keys)


def run_all(rank: int, world: int, configs: dict[str, dict]) -> dict[str, dict]:
    """Several runs in the same ranks: DeepSpeed's first initialize costs ~8 s (op loading), later ones ~0."""
    out = {}
    for key, kw in configs.items():
        kw = dict(kw)
        fn = resume if kw.pop("resume", False) else train
        try:
            out[key] = fn(rank, world, **kw)
        except RuntimeError as e:
            out[key] = dict(error=str(e))
    return out


def train_bf16_stage0(rank: int, world: int, opt: str) -> dict:
    """ZeRO stage 0 with bf16: DeepSpeed wraps the client optimizer in FP16_UnfusedOptimizer, which hands it
    full-shape fp32 copies of the parameters. Returns those fp32 master weights after training, by name."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    if opt == "ours":
        optimizer = hf_adamp.AdamP(param_groups(model), lr=LR)
    else:
        optimizer = adamp.AdamP(param_groups(model), lr=LR)
    cfg = zero_config(0)
    cfg["bf16"] = {"enabled": True}
    engine, wrapper, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    decisions: dict[str, set[str]] = {}
    for step in range(STEPS):
        x, y = batch(step, world)
        x, y = x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]
        loss = F.mse_loss(engine(x.to(torch.bfloat16)).float(), y)
        engine.backward(loss)
        engine.step()
        if opt == "ours":
            for key, kind in optimizer.projection_decisions().items():
                decisions.setdefault(tuple(key.shape), set()).add(kind)
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    originals = [p for group in wrapper.fp16_groups for p in group]
    return dict(
        wrapper=type(wrapper).__name__,
        masters={names[id(o)]: m.detach().clone() for o, m in zip(originals, masters)},
        decisions=decisions,
    )


def bf16_stage0_both(rank: int, world: int) -> dict:
    """train_bf16_stage0 with our AdamP and with the reference, in the same ranks."""
    return {opt: train_bf16_stage0(rank, world, opt) for opt in ("ours", "reference")}
