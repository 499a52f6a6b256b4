"""Check, under your own launcher and config, that AdamP/SGDP give the numbers of a single process.

    accelerate launch [your config / flags] -m hf_adamp.selfcheck
    torchrun --nproc_per_node 2 -m hf_adamp.selfcheck      # DDP through accelerate's defaults
    python -m hf_adamp.selfcheck                            # one process

A small model whose layers exercise all three AdamP outcomes (channel, layer, none) is trained for a
few steps through ``accelerator.prepare`` (DDP, FSDP, DeepSpeed ZeRO: whatever the launch configured),
and, on every rank, by a plain single-process optimizer on the whole global batch. The weights must
agree. Exit status 0 on PASS, 1 on FAIL. ``--optimizer reference`` runs the reference ``adamp`` package
instead, to show what the check catches (it turns into AdamW under ZeRO and FSDP1).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

MICRO = 4  # samples per rank and step


class _RowNormLinear(nn.Linear):
    """Rows normalised in the forward pass: every row of the weight is scale-invariant (channel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rows = _RowNormLinear(11, 19)  # channel
        self.whole = nn.Linear(19, 13, bias=False)  # followed by a LayerNorm: layer
        self.norm = nn.LayerNorm(13, elementwise_affine=False)
        self.head = nn.Linear(13, 5)  # none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.whole(torch.tanh(self.rows(x))))))


def _batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(world * MICRO, 11, generator=gen), torch.randn(world * MICRO, 5, generator=gen)


def _make_optimizer(kind: str, params, lr: float, plain: bool = False) -> torch.optim.Optimizer:
    import hf_adamp

    if kind == "reference":
        import adamp

        return adamp.AdamP(params, lr=lr, weight_decay=0.1)
    if kind == "sgdp":
        return hf_adamp.SGDP(params, lr=lr, momentum=0.9, weight_decay=0.1, foreach=not plain)
    return hf_adamp.AdamP(params, lr=lr, weight_decay=0.1, foreach=not plain)


def _gradient_clipping(model: nn.Module) -> float:
    """The clipping a DeepSpeed engine applies (its config may leave it to DeepSpeed's default)."""
    clipping = getattr(model, "gradient_clipping", None)
    return float(clipping()) if callable(clipping) else 0.0


def _full_weights(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters on every rank: gathered from ZeRO-3 partitions, FSDP shards, or as they are."""
    params = dict(accelerator.unwrap_model(model).named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3: partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().cpu().clone() for n, p in params.items()}
    return accelerator.get_state_dict(model)


def run(optimizer: str = "adamp", steps: int = 8, lr: float = 0.05, tolerance: float = 1e-5) -> bool:
    """Train both ways; print a report on the main process; return whether the weights agree."""
    from accelerate import Accelerator

    from .telemetry import find_projected_optimizer

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # accelerate picks no process group on a machine without an accelerator unless told it runs on CPU
    on_cpu = launched > 1 and not deepspeed and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=on_cpu)
    world, rank = accelerator.num_processes, accelerator.process_index
    if world != launched:
        raise SystemExit(
            f"hf_adamp self-check: the launcher started {launched} processes but accelerate sees {world}; "
            "on a machine without GPUs accelerate runs DeepSpeed on one process only (see README)."
        )
    torch.manual_seed(0)
    model = _Net()
    reference = copy.deepcopy(model)
    ref_opt = _make_optimizer("adamp" if optimizer == "reference" else optimizer, reference.parameters(), lr, True)
    opt = _make_optimizer(optimizer, model.parameters(), lr)
    # a loader lets accelerate fill DeepSpeed's "auto" batch sizes
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(MICRO * world, 1)), MICRO)
    model, opt, _ = accelerator.prepare(model, opt, loader)
    clip = _gradient_clipping(model)

    for step in range(steps):
        x, y = _batch(step, world)
        local = slice(rank * MICRO, (rank + 1) * MICRO)
        accelerator.backward(F.mse_loss(model(x[local]), y[local]))
        opt.step()
        opt.zero_grad()

        ref_opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        ref_opt.step()

    got = _full_weights(accelerator, model)
    inner = find_projected_optimizer(opt)
    decisions = sorted(set(inner.projection_decisions().values())) if inner is not None else []
    errors = {}
    for name, want in reference.state_dict().items():
        have = got[name].detach().float().cpu()
        errors[name] = ((have - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    worst = max(errors.values())
    ok = worst <= tolerance
    if accelerator.is_main_process:
        layouts = getattr(inner, "_layouts", []) if inner is not None else []
        bytes_per_step = sum(layout.collective_bytes() for layout in layouts) if layouts else 0
        print(
            f"hf_adamp self-check: {accelerator.distributed_type} on {world} process(es), "
            f"optimizer {optimizer}, {steps} steps, gradient clipping {clip or 'off'}"
        )
        print(
            f"  decisions at the last step: {', '.join(decisions) or 'n/a'}; "
            f"sharding layouts: {len(layouts)}, statistics all_reduce: {bytes_per_step} bytes per step"
        )
        for name, err in errors.items():
            print(f"  {name:16s} max relative error {err:.2e}")
        print(f"{'PASS' if ok else 'FAIL'}: worst {worst:.2e}, tolerance {tolerance:.0e}")
    accelerator.wait_for_everyone()
    return ok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m hf_adamp.selfcheck", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--optimizer", choices=["adamp", "sgdp", "reference"], default="adamp")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tolerance", type=float, default=1e-5)
    args = ap.parse_args(argv)
    sys.exit(0 if run(args.optimizer, args.steps, tolerance=args.tolerance) else 1)


if __name__ == "__main__":
    main()
