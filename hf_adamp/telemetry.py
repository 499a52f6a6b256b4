"""Show the projection at work: what AdamP decided, weight norms and effective step sizes, in Trainer logs.

The optimizers keep the last step's decision as device tensors (``ProjectedOptimizer.last_record``); it
costs nothing until read. ``projection_metrics`` reads it (one host sync), so read it on logging steps only.
Under ZeRO/FSDP the record comes from the reduced row sums, so it is global and the same on every rank.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback

from . import projection
from .optim._engine import ProjectedOptimizer

# Weight-normalised layers store the direction v here; v is scale-invariant by construction.
DEFAULT_SCALE_INVARIANT = (r"parametrizations\.weight\.original1$",)


def find_projected_optimizer(optimizer: Any) -> ProjectedOptimizer | None:
    """Our optimizer inside the wrappers of accelerate and DeepSpeed (``.optimizer`` chains)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, ProjectedOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def projection_metrics(optimizer: Any, prefix: str = "projection/") -> dict[str, float]:
    """Counts of parameters per outcome of the last step, and the norm and effective step size
    ``lr / |w|^2`` of the projected ones. Empty for optimizers without a projection record."""
    opt = find_projected_optimizer(optimizer)
    record = opt.last_record if opt is not None else None
    if record is None:
        return {}
    kind = record.kind.long()
    counts = torch.bincount(kind, minlength=3).tolist()
    projected = kind != projection.NONE
    norm_sq = torch.where(projected, record.weight_norm.square(), torch.zeros_like(record.weight_norm))
    n_proj = counts[projection.CHANNEL] + counts[projection.LAYER]
    out = {
        f"{prefix}channel": float(counts[projection.CHANNEL]),
        f"{prefix}layer": float(counts[projection.LAYER]),
        f"{prefix}none": float(counts[projection.NONE]),
    }
    if n_proj:
        eff = torch.where(projected, record.lr / record.weight_norm.square().clamp_min(1e-30), 0.0)
        values = torch.stack([norm_sq.sum().sqrt(), eff.sum() / n_proj]).tolist()
        out[f"{prefix}projected_weight_norm"] = values[0]
        out[f"{prefix}effective_step_size"] = values[1]
    return out


def scale_invariant_parameters(
    model: torch.nn.Module, patterns: Iterable[str] = DEFAULT_SCALE_INVARIANT
) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters whose name matches one of ``patterns`` (regular expressions): by default the
    directions of weight-normalised layers, which any optimizer's run can be compared on."""
    compiled = [re.compile(p) for p in patterns]
    return [(n, p) for n, p in model.named_parameters() if any(c.search(n) for c in compiled)]


def scale_invariant_metrics(
    model: torch.nn.Module,
    lr: float,
    patterns: Iterable[str] = DEFAULT_SCALE_INVARIANT,
    prefix: str = "scale_invariant/",
) -> dict[str, float]:
    """Norm (root of the sum of squares) and mean effective step size ``lr / |w|^2`` of the
    scale-invariant parameters, for AdamW and AdamP runs alike."""
    params = scale_invariant_parameters(model, patterns)
    if not params:
        return {}
    with torch.no_grad():
        sq = torch.stack([p.detach().float().square().sum() for _, p in params])
        values = torch.stack([sq.sum().sqrt(), (lr / sq.clamp_min(1e-30)).mean()]).tolist()
    return {f"{prefix}weight_norm": values[0], f"{prefix}effective_step_size": values[1], f"{prefix}count": len(params)}


class ProjectionLoggingCallback(TrainerCallback):
    """Adds projection and scale-invariant-weight metrics to the Trainer's logs at each logging step.

    Trainer hands ``logs`` to the callbacks in order, so reporting integrations (TensorBoard, W&B, ...)
    see these metrics only if this callback comes before them: use :func:`add_projection_logging`.
    ``trainer_state.json`` gets them either way.
    """

    def __init__(self, patterns: Iterable[str] = DEFAULT_SCALE_INVARIANT) -> None:
        self.patterns = tuple(patterns)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # The starting point of the norm curves (a fresh run only: a resumed one has its history already).
        if state.global_step == 0 and model is not None:
            metrics = scale_invariant_metrics(model, float(args.learning_rate), self.patterns)
            if metrics:
                state.log_history.append({"step": 0, **metrics})

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if logs is None or "loss" not in logs:  # training logs only, not evaluation or the final summary
            return
        metrics = projection_metrics(optimizer)
        lr = logs.get("learning_rate")
        if lr is None and optimizer is not None:
            lr = optimizer.param_groups[0]["lr"]
        if model is not None and lr is not None:
            metrics.update(scale_invariant_metrics(model, float(lr), self.patterns))
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def add_projection_logging(
    trainer: Any, patterns: Iterable[str] = DEFAULT_SCALE_INVARIANT
) -> ProjectionLoggingCallback:
    """Put a :class:`ProjectionLoggingCallback` first in ``trainer``'s callbacks, so every reporter sees it."""
    callback = ProjectionLoggingCallback(patterns)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
