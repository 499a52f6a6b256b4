"""Argument checks of the optimizers' constructors, and reading a group's learning rate."""

from __future__ import annotations

from typing import Any

from torch import Tensor

# torch's wording where torch's optimizers make the same check, so code matching their messages keeps working
_TORCH_NAMES = {
    "lr": "learning rate",
    "eps": "epsilon value",
    "weight_decay": "weight_decay value",
    "momentum": "momentum value",
}


def _described(name: str) -> str:
    if name.startswith("betas["):
        return f"beta parameter at index {name[6:-1]}"
    return _TORCH_NAMES.get(name, name)


def check_non_negative(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element (got a tensor of shape {tuple(value.shape)})")
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Invalid {_described(name)}: {name} must be a number, got {type(value).__name__}")
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {_described(name)}: {value} ({name} must be >= 0)")


def check_range(name: str, value: Any, low: float, high: float, high_inclusive: bool) -> None:
    check_non_negative(name, value)
    value = value.item() if isinstance(value, Tensor) else value
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"Invalid {_described(name)}: {value} ({name} must be in [{low}, {high}{bracket})")


def check_fused(fused: Any, foreach: Any) -> None:
    """torch's rule and words: ``fused`` and ``foreach`` are not both True."""
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"Invalid fused: expected True, False or None, got {fused!r}")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def lr_of(group: dict[str, Any]) -> float:
    """The group's learning rate as a number (a tensor lr of any 1-element shape is read once per step)."""
    lr = group["lr"]
    return lr.item() if isinstance(lr, Tensor) else lr
