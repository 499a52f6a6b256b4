"""A small model whose weights exercise all three AdamP outcomes, its data, and the single-process reference.

- ``fc1`` (rows normalised in forward): every row is scale-invariant -> "channel";
- ``fc2`` followed by a LayerNorm without affine: the whole weight is scale-invariant -> "layer";
- ``fc3``: plain -> "none";
- ``gate``: one output row, so on 2 ranks FSDP2 gives one rank an empty shard.
Shapes are odd on purpose, so partitions cut parameters inside rows.
"""

from __future__ import annotations

import adamp
import torch
from torch import nn
from torch.nn import functional as F

STEPS = 12
MICRO = 4  # samples per rank and step
LR = 0.05
WD = 0.1


class RowNormLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = RowNormLinear(11, 19)
        self.fc2 = nn.Linear(19, 13, bias=False)
        self.ln = nn.LayerNorm(13, elementwise_affine=False)
        self.fc3 = nn.Linear(13, 5)
        self.gate = nn.Linear(13, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.ln(self.fc2(torch.tanh(self.fc1(x)))))
        return self.fc3(h) + self.gate(h)


def make_model() -> Net:
    torch.manual_seed(1234)
    return Net()


def batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(world * MICRO, 11, generator=gen), torch.randn(world * MICRO, 5, generator=gen)


def param_groups_names(model: nn.Module) -> list[list[str]]:
    names = [n for n, _ in model.named_parameters()]
    return [[n for n in names if n.endswith("weight")], [n for n in names if not n.endswith("weight")]]


def param_groups(model: nn.Module, weight_decay: float = WD) -> list[dict]:
    params = dict(model.named_parameters())
    decay, no_decay = ([params[n] for n in names] for names in param_groups_names(model))
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def reference_run(world: int, steps: int = STEPS, all_decay: bool = False) -> dict[str, torch.Tensor]:
    """Single process, full batch (mean loss), the reference optimizer."""
    model = make_model()
    groups = [dict(params=list(model.parameters()), weight_decay=WD)] if all_decay else param_groups(model)
    ref = adamp.AdamP(groups, lr=LR)
    for step in range(steps):
        x, y = batch(step, world)
        ref.zero_grad()
        F.mse_loss(model(x), y).backward()
        ref.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: ((got[n] - w).abs().max() / w.abs().max()).item() for n, w in want.items()}
