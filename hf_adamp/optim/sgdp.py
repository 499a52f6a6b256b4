"""SGDP: SGD with momentum whose update loses its radial component on scale-invariant weights."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import required

from .. import projection
from . import _triton
from ._base import (
    Item,
    ProjectedOptimizer,
    check_non_negative,
    check_range,
    compute_copy,
    flat,
    load_segment,
    lr_of,
    seg_view,
    state_dtype,
    write_back,
)


class SGDP(ProjectedOptimizer):
    """SGDP, with the arguments and defaults of the reference ``adamp.SGDP`` (0.3.0).

    Args:
        params: parameters or parameter groups.
        lr: learning rate: required, here or in every parameter group (as torch's SGD and the reference).
        momentum: momentum factor, in [0, 1).
        dampening: dampening of the gradient added to the momentum buffer, in [0, 1].
        weight_decay: ``p *= 1 - lr * weight_decay * ratio / (1 - momentum)``, with ``ratio = wd_ratio`` on
            parameters whose update was projected and 1 elsewhere (the reference's scaling).
        nesterov: Nesterov momentum (with ``momentum=0`` it changes nothing and warns, as in the reference).
        eps, delta, wd_ratio: as for :class:`hf_adamp.AdamP`.
        maximize, foreach: as for :class:`hf_adamp.AdamP`.

    Like the reference, the first step stores ``(1 - dampening) * grad`` in the momentum buffer (torch's
    SGD stores ``grad``), and without Nesterov the projected update is written back into the buffer.
    State per parameter: ``momentum`` (fp32 for fp16/bf16 parameters, else the parameter's dtype).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = required,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if lr is not required:  # else every group must give its own (torch's add_param_group checks)
            check_non_negative("lr", lr)
        check_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)
        check_range("dampening", dampening, 0.0, 1.0, high_inclusive=True)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("eps", eps)
        check_non_negative("delta", delta)
        check_range("wd_ratio", wd_ratio, 0.0, 1.0, high_inclusive=True)
        if nesterov and momentum == 0:  # accepted, as adamp.SGDP does: the step is then plain SGDP's
            warnings.warn(
                "SGDP: nesterov=True has no effect with momentum=0 (the step is plain SGDP's); accepted like "
                "adamp.SGDP. Set momentum > 0 for Nesterov momentum.",
                UserWarning,
                stacklevel=2,
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=bool(nesterov),
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            maximize=bool(maximize),
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _init_state(self, param: Tensor, state: dict[str, Any]) -> None:
        state["momentum"] = torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)

    def _prepare(self, item: Item) -> None:
        group = item.group
        item.scalars = dict(
            momentum=group["momentum"],
            dampening=group["dampening"],
            lr=lr_of(group),
            decay=self._decay_factors(group)[0],
        )

    def _decay_factors(self, group: dict[str, Any]) -> tuple[float, float]:
        scaled = lr_of(group) * group["weight_decay"] / (1 - group["momentum"])
        return 1.0 - scaled, 1.0 - scaled * group["wd_ratio"]

    # ----- plain path -----
    def _first_plain(self, item: Item, stats: Tensor) -> None:
        s, group = item.scalars, item.group
        param, grad = compute_copy(item.param), compute_copy(item.grad)
        if group["maximize"]:
            grad = -grad
        buf = item.state["momentum"]
        buf.mul_(s["momentum"]).add_(grad, alpha=1 - s["dampening"])
        update = grad + s["momentum"] * buf if group["nesterov"] else buf  # the buffer itself, as in the reference

        if any(seg.slot >= 0 for seg in item.segments):
            f_g, f_p, f_u = flat(grad), flat(param), flat(update)
            for seg in item.segments:
                if seg.slot >= 0:
                    rows = stats[:, seg.stat_row : seg.stat_row + seg.rows]
                    projection.accumulate_row_sums(rows, seg_view(f_g, seg), seg_view(f_p, seg), seg_view(f_u, seg))
            item.extra = dict(param=param, update=update)
            return
        if group["weight_decay"] > 0:
            param.mul_(s["decay"])
        param.add_(update, alpha=-s["lr"])
        write_back(item.param, param)

    def _second_plain(self, item: Item, coef: Tensor, decay: Tensor) -> None:
        if not item.extra:
            return
        s, group = item.scalars, item.group
        param, update = item.extra["param"], item.extra["update"]
        f_p, f_u = flat(param), flat(update)
        for seg in item.segments:
            p_seg = seg_view(f_p, seg)
            if seg.slot >= 0:
                projection.subtract_projection(seg_view(f_u, seg), p_seg, coef[seg.stat_row : seg.stat_row + seg.rows])
            if group["weight_decay"] > 0:
                p_seg.mul_(decay[seg.slot] if seg.slot >= 0 else s["decay"])
        param.add_(update, alpha=-s["lr"])
        write_back(item.param, param)
        item.extra = {}

    # ----- fast path -----
    def _first_fast(self, item: Item, stats: Tensor) -> None:
        if _triton.usable(item, self._STATE_KEYS):  # CUDA
            return _triton.sgd_first(self, item, stats, self._STATE_KEYS)
        s, group = item.scalars, item.group
        f_p, f_g, f_b = flat(item.param), flat(item.grad), flat(item.state["momentum"])
        dt = f_b.dtype
        upcast = f_p.dtype != dt
        for seg in item.segments:
            d_buf, tmp, g_buf, p_buf = self.scratch(dt, f_b.device, 4, seg.rows * seg.row_len)
            g = load_segment(seg_view(f_g, seg), g_buf, seg, upcast, group["maximize"])
            b = seg_view(f_b, seg)
            if s["dampening"] == 0:
                torch.add(g, b, alpha=s["momentum"], out=b)  # one pass instead of two
            else:
                b.mul_(s["momentum"]).add_(g, alpha=1 - s["dampening"])
            d = self._direction(d_buf, b, g, s, group["nesterov"], seg)
            p = load_segment(seg_view(f_p, seg), p_buf, seg, upcast, False)
            if seg.slot < 0:
                if group["weight_decay"] > 0:
                    p.mul_(s["decay"])
                p.add_(d, alpha=-s["lr"])
                if upcast:
                    seg_view(f_p, seg).copy_(p)
                continue
            tmp = tmp.view(seg.rows, seg.row_len)
            projection.write_row_sums(stats[:, seg.stat_row : seg.stat_row + seg.rows], g, p, d, tmp)

    def _second_fast(self, item: Item, coef: Tensor, decay: Tensor) -> None:
        if "triton" in item.extra:
            return _triton.sgd_second(item, coef, decay)
        s, group = item.scalars, item.group
        if all(seg.slot < 0 for seg in item.segments):
            return
        f_p, f_g, f_b = flat(item.param), flat(item.grad), flat(item.state["momentum"])
        dt = f_b.dtype
        upcast = f_p.dtype != dt
        for seg in item.segments:
            if seg.slot < 0:
                continue
            d_buf, tmp, g_buf, p_buf = self.scratch(dt, f_b.device, 4, seg.rows * seg.row_len)
            g = load_segment(seg_view(f_g, seg), g_buf, seg, upcast, group["maximize"]) if group["nesterov"] else None
            d = self._direction(d_buf, seg_view(f_b, seg), g, s, group["nesterov"], seg)
            p = load_segment(seg_view(f_p, seg), p_buf, seg, upcast, False)
            tmp = tmp.view(seg.rows, seg.row_len)
            projection.subtract_projection(d, p, coef[seg.stat_row : seg.stat_row + seg.rows], tmp)
            if group["weight_decay"] > 0:
                p.mul_(decay[seg.slot])
            p.add_(d, alpha=-s["lr"])
            if upcast:
                seg_view(f_p, seg).copy_(p)

    # ----- fused kernels (hf_adamp.kernels, driven by _fused): one row of the kernels' scalar table per run -----
    _KERNELS = "sgd"
    _STATE_KEYS = ("momentum",)

    def _kernel_scalars(self, group: dict[str, Any], step: int, decay: float) -> list[float]:
        nesterov, maximize = float(group["nesterov"]), float(group["maximize"])
        return [group["momentum"], group["dampening"], lr_of(group), decay, group["eps"], nesterov, maximize]

    @staticmethod
    def _direction(out: Tensor, buf: Tensor, grad: Tensor | None, s: dict, nesterov: bool, seg: Any) -> Tensor:
        """The un-projected update: grad + momentum * buf (Nesterov), else the buffer itself."""
        if not nesterov:
            return buf
        return torch.add(grad, buf, alpha=s["momentum"], out=out.view(seg.rows, seg.row_len))
