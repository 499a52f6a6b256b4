"""Shared test helpers: parameter sets, and gradients that force each projection outcome."""

from __future__ import annotations

import torch

# 1-D, 2-D, 4-D conv, a single row, a single column, large rows.
SHAPES = [(6,), (7, 5), (4, 3, 3, 3), (1, 40), (9, 1), (3, 3000), (16, 24)]

MODES = ("channel", "layer", "none", "random")


def make_params(shapes=SHAPES, dtype=torch.float64, seed=0, device="cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # drawn on CPU, so that every device gets the same values
    return [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]


def forced_grad(p: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """A gradient for ``p`` that makes AdamP take ``mode``: "channel" (orthogonal to every row),
    "layer" (orthogonal to the whole tensor but not to its rows), "none" (mostly along p) or "random".
    ``gen`` is a CPU generator, whatever the device of ``p``."""
    g = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
    if p.dim() <= 1 or mode == "random":
        return g
    p = p.detach()
    if mode == "none":
        return g + p
    if mode == "channel" and p[0].numel() == 1:
        return torch.zeros_like(g)  # rows of one element: only a zero gradient is orthogonal to them
    view = (p.shape[0], -1) if mode == "channel" else (1, -1)
    pr, gr = p.reshape(view), g.reshape(view)
    gr = gr - pr * (gr * pr).sum(1, keepdim=True) / (pr * pr).sum(1, keepdim=True)
    return gr.reshape(p.shape)


def expected_outcomes(shape) -> set[str]:
    """The outcomes the forced gradients can produce for a parameter of this shape."""
    if len(shape) <= 1:
        return set()
    rows = shape[0]
    if rows == 1:  # the channel view is the layer view
        return {"channel", "none"}
    return {"channel", "layer", "none"}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
