"""AdamP: Adam whose update loses its radial component on scale-invariant weights (Heo et al., 2021)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

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


class AdamP(ProjectedOptimizer):
    """AdamP, with the arguments and defaults of the reference ``adamp.AdamP`` (0.3.0).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator, and the norm floor of the cosine test.
        weight_decay: decoupled weight decay (``p *= 1 - lr * weight_decay``), scaled by ``wd_ratio`` on
            parameters whose update was projected.
        delta: threshold of the cosine test, ``cos < delta / sqrt(row length)``.
        wd_ratio: weight-decay multiplier for projected parameters.
        nesterov: use the Nesterov form of the first moment.
        maximize: maximise the objective instead of minimising it.
        foreach: ``None`` or ``True`` for the fast chunked path, ``False`` for the plain per-tensor path.

    State per parameter: ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (fp32 for fp16/bf16 parameters,
    else the parameter's dtype), the names of the reference, so checkpoints move between the two.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_non_negative("lr", lr)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("delta", delta)
        check_range("wd_ratio", wd_ratio, 0.0, 1.0, high_inclusive=True)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"Invalid betas: expected a pair of floats, got {betas!r}")
        for i, beta in enumerate(betas):
            check_range(f"betas[{i}]", beta, 0.0, 1.0, high_inclusive=False)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=bool(nesterov),
            maximize=bool(maximize),
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _init_state(self, param: Tensor, state: dict[str, Any]) -> None:
        dt = state_dtype(param)
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, dtype=dt, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=dt, memory_format=torch.preserve_format)

    def _advance_step(self, state: dict[str, Any]) -> int:
        state["step"] = int(state["step"]) + 1
        return state["step"]

    def _prepare(self, item: Item) -> None:
        group = item.group
        step = self._advance_step(item.state)
        beta1, beta2 = group["betas"]
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        item.scalars = dict(
            beta1=beta1,
            beta2=beta2,
            sqrt_bc2=math.sqrt(bc2),
            step_size=lr_of(group) / bc1,
            eps=group["eps"],
            decay=1.0 - lr_of(group) * group["weight_decay"],
        )

    def _decay_factors(self, group: dict[str, Any]) -> tuple[float, float]:
        lr_wd = lr_of(group) * group["weight_decay"]
        return 1.0 - lr_wd, 1.0 - lr_wd * group["wd_ratio"]

    # ----- plain path: whole tensors, in the reference's own order of operations -----
    def _first_plain(self, item: Item, stats: Tensor) -> None:
        s, group = item.scalars, item.group
        param, grad = compute_copy(item.param), compute_copy(item.grad)
        if group["maximize"]:
            grad = -grad
        exp_avg, exp_avg_sq = item.state["exp_avg"], item.state["exp_avg_sq"]

        exp_avg.mul_(s["beta1"]).add_(grad, alpha=1 - s["beta1"])
        exp_avg_sq.mul_(s["beta2"]).addcmul_(grad, grad, value=1 - s["beta2"])
        denom = (exp_avg_sq.sqrt() / s["sqrt_bc2"]).add_(s["eps"])
        if group["nesterov"]:
            update = (s["beta1"] * exp_avg + (1 - s["beta1"]) * grad) / denom
        else:
            update = exp_avg / denom

        if any(seg.slot >= 0 for seg in item.segments):
            f_g, f_p, f_u = flat(grad), flat(param), flat(update)
            for seg in item.segments:
                if seg.slot >= 0:
                    rows = stats[:, seg.stat_row : seg.stat_row + seg.rows]
                    projection.accumulate_row_sums(rows, seg_view(f_g, seg), seg_view(f_p, seg), seg_view(f_u, seg))
            item.extra = dict(param=param, update=update)
            return
        # never projected: plain Adam with decoupled weight decay, finished now
        if group["weight_decay"] > 0:
            param.mul_(s["decay"])
        param.add_(update, alpha=-s["step_size"])
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
        param.add_(update, alpha=-s["step_size"])
        write_back(item.param, param)
        item.extra = {}

    # ----- fast path: the same maths in cache-sized chunks, update recomputed in the second half -----
    def _first_fast(self, item: Item, stats: Tensor) -> None:
        if _triton.usable(item, self._STATE_KEYS):  # CUDA
            return _triton.adam_first(self, item, stats, self._STATE_KEYS)
        if _fusable(item):
            return self._first_fused(item, stats)
        s, group = item.scalars, item.group
        f_p, f_g = flat(item.param), flat(item.grad)
        f_m, f_v = flat(item.state["exp_avg"]), flat(item.state["exp_avg_sq"])
        dt = f_m.dtype
        upcast = f_p.dtype != dt
        for seg in item.segments:
            n = seg.rows * seg.row_len
            u, tmp, g_buf, p_buf = self.scratch(dt, f_m.device, 4, n)
            u, tmp = u.view(seg.rows, seg.row_len), tmp.view(seg.rows, seg.row_len)
            g = load_segment(seg_view(f_g, seg), g_buf, seg, upcast, group["maximize"])
            m, v = seg_view(f_m, seg), seg_view(f_v, seg)
            m.lerp_(g, 1 - s["beta1"])
            v.mul_(s["beta2"]).addcmul_(g, g, value=1 - s["beta2"])
            p = load_segment(seg_view(f_p, seg), p_buf, seg, upcast, False)
            self._direction(u, tmp, m, v, g, s, group["nesterov"])  # u = update / sqrt_bc2
            if seg.slot < 0:
                if group["weight_decay"] > 0:
                    p.mul_(s["decay"])
                p.add_(u, alpha=-s["step_size"] * s["sqrt_bc2"])
                if upcast:
                    seg_view(f_p, seg).copy_(p)
                continue
            projection.write_row_sums(stats[:, seg.stat_row : seg.stat_row + seg.rows], g, p, u, tmp)

    def _second_fast(self, item: Item, coef: Tensor, decay: Tensor) -> None:
        if "triton" in item.extra:
            return _triton.adam_second(item, coef, decay)
        s, group = item.scalars, item.group
        if all(seg.slot < 0 for seg in item.segments):
            return
        if _fusable(item):
            return self._second_fused(item, coef, decay)
        f_p, f_g = flat(item.param), flat(item.grad)
        f_m, f_v = flat(item.state["exp_avg"]), flat(item.state["exp_avg_sq"])
        dt = f_m.dtype
        upcast = f_p.dtype != dt
        step = -s["step_size"] * s["sqrt_bc2"]
        for seg in item.segments:
            if seg.slot < 0:
                continue
            n = seg.rows * seg.row_len
            u, tmp, g_buf, p_buf = self.scratch(dt, f_m.device, 4, n)
            u, tmp = u.view(seg.rows, seg.row_len), tmp.view(seg.rows, seg.row_len)
            m, v = seg_view(f_m, seg), seg_view(f_v, seg)
            g = load_segment(seg_view(f_g, seg), g_buf, seg, upcast, group["maximize"]) if group["nesterov"] else None
            p = load_segment(seg_view(f_p, seg), p_buf, seg, upcast, False)
            self._direction(u, tmp, m, v, g, s, group["nesterov"])
            # u and the PU sums are both scaled by 1 / sqrt_bc2; the projection is linear in u
            projection.subtract_projection(u, p, coef[seg.stat_row : seg.stat_row + seg.rows], tmp)
            if group["weight_decay"] > 0:
                p.mul_(decay[seg.slot])
            p.add_(u, alpha=step)
            if upcast:
                seg_view(f_p, seg).copy_(p)

    # ----- fused kernels (hf_adamp.kernels, driven by _fused): one row of the kernels' scalar table per run -----
    _KERNELS = "adam"
    _STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def _kernel_scalars(self, group: dict[str, Any], step: int, decay: float) -> list[float]:
        # _prepare's maths: the kernels divide by sqrt(v) + eps * sqrt_bc2 and step by lr / bc1 * sqrt_bc2
        beta1, beta2 = group["betas"]
        sqrt_bc2 = math.sqrt(1.0 - beta2**step)
        step_size = lr_of(group) / (1.0 - beta1**step)
        nesterov, maximize = float(group["nesterov"]), float(group["maximize"])
        return [beta1, beta2, group["eps"] * sqrt_bc2, step_size * sqrt_bc2, decay, group["eps"], nesterov, maximize]

    # ----- fused variant: torch's fused AdamW kernel applies the step -----
    # AdamP's step is AdamW's step on a weight pre-scaled row by row:
    #   p_new = decay * p - step_size * (u - coef * p) = (decay + step_size * coef) * p - step_size * u,
    # so the first half computes the new moments only into scratch (for p.u), and the second half scales p
    # and lets the fused kernel update the moments and the weight in one pass.
    def _first_fused(self, item: Item, stats: Tensor) -> None:
        s, group = item.scalars, item.group
        f_p, f_g = flat(item.param), flat(item.grad)
        f_m, f_v = flat(item.state["exp_avg"]), flat(item.state["exp_avg_sq"])
        plain = [seg for seg in item.segments if seg.slot < 0]
        if plain:  # never projected: AdamW, weight decay included
            self._fused_step(item, ([seg_view(t, seg) for seg in plain] for t in (f_p, f_g, f_m, f_v)))
        for seg in item.segments:
            if seg.slot < 0:
                continue
            m_new, u, tmp, g_buf = self.scratch(f_m.dtype, f_m.device, 4, seg.rows * seg.row_len)
            m_new, u, tmp = (t.view(seg.rows, seg.row_len) for t in (m_new, u, tmp))
            g = load_segment(seg_view(f_g, seg), g_buf, seg, False, group["maximize"])
            p = seg_view(f_p, seg)
            torch.lerp(seg_view(f_m, seg), g, 1 - s["beta1"], out=m_new)
            torch.mul(seg_view(f_v, seg), s["beta2"], out=u).addcmul_(g, g, value=1 - s["beta2"])
            u.sqrt_().add_(s["eps"] * s["sqrt_bc2"])
            torch.div(m_new, u, out=u)  # the update divided by sqrt_bc2
            projection.write_row_sums(stats[:, seg.stat_row : seg.stat_row + seg.rows], g, p, u, tmp)

    def _second_fused(self, item: Item, coef: Tensor, decay: Tensor) -> None:
        s = item.scalars
        f_p, f_g = flat(item.param), flat(item.grad)
        f_m, f_v = flat(item.state["exp_avg"]), flat(item.state["exp_avg_sq"])
        # coef is per unit of (update / sqrt_bc2), like the PU sums it came from
        coef_scale = s["step_size"] * s["sqrt_bc2"]
        for seg in item.segments:
            if seg.slot < 0:
                continue
            rows = coef[seg.stat_row : seg.stat_row + seg.rows]
            p = seg_view(f_p, seg)
            p.mul_(torch.add(decay[seg.slot], rows, alpha=coef_scale)[:, None])
            self._fused_step(item, ([seg_view(t, seg)] for t in (f_p, f_g, f_m, f_v)), weight_decay=0.0)

    @staticmethod
    def _fused_step(item: Item, tensors, weight_decay: float | None = None) -> None:
        params, grads, exp_avgs, exp_avg_sqs = tensors
        group, s = item.group, item.scalars
        step = torch.tensor(float(item.state["step"]), dtype=torch.float32, device=item.param.device)
        torch._fused_adamw_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            [step] * len(params),
            amsgrad=False,
            lr=lr_of(group),
            beta1=s["beta1"],
            beta2=s["beta2"],
            eps=s["eps"],
            maximize=group["maximize"],
            weight_decay=group["weight_decay"] if weight_decay is None else weight_decay,
        )

    @staticmethod
    def _direction(u: Tensor, tmp: Tensor, m: Tensor, v: Tensor, g: Tensor | None, s: dict, nesterov: bool) -> None:
        """u = Adam's update divided by sqrt(1 - beta2^t): m_hat / (sqrt(v) + eps * sqrt(1 - beta2^t))."""
        torch.sqrt(v, out=u)
        u.add_(s["eps"] * s["sqrt_bc2"])
        if nesterov:
            torch.mul(m, s["beta1"], out=tmp)
            tmp.add_(g, alpha=1 - s["beta1"])
            torch.div(tmp, u, out=u)
        else:
            torch.div(m, u, out=u)


def _fusable(item: Item) -> bool:
    """torch's fused AdamW can apply this tensor's step: same dtype for weight, gradient and state, no
    Nesterov (the kernel has no Nesterov form), and a device the kernel supports."""
    p = item.param
    return (
        not item.group["nesterov"]
        and p.dtype == item.grad.dtype == item.state["exp_avg"].dtype
        and p.device.type in _FUSED_DEVICES
        and hasattr(torch, "_fused_adamw_")
    )


_FUSED_DEVICES = ("cpu", "cuda")
