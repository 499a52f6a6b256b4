"""The eager backend: the same maths as the reference in cache-sized chunks of torch ops, the update recomputed
in pass 2 instead of kept (the default on accelerators, and on CPUs without the C++ kernels).

AdamP has a second form here, for tensors whose weight, gradient and state share one dtype and that use no
Nesterov: torch's own AdamW kernel (``torch._fused_adamw_``, a torch op, not one of hf_adamp's kernels) applies
the step. AdamP's step is AdamW's step on a weight pre-scaled row by row,
``p_new = decay * p - step_size * (u - coef * p) = (decay + step_size * coef) * p - step_size * u``,
so pass 1 computes the new moments into scratch only (for the sums p.u), and pass 2 scales p and lets torch's
kernel update the moments and the weight in one go.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import projection
from ..._tensors import flat, load_segment, seg_view
from .._step import Decided, Item, Switches
from .base import Backend

# Elements per chunk: every operand's chunk stays in cache between the chunk's operations.
# 2**18 measured best of 2**17..2**22 at GPT-2-small shapes on a 2-core EPYC (benchmarks/step_time.py).
CHUNK_ELEMS = 1 << 18
_TORCH_ADAMW_DEVICES = ("cpu", "cuda")


class Eager(Backend):
    name = "eager"

    def __init__(self, rule) -> None:
        super().__init__(rule)
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def segment_elems(self) -> int:
        return CHUNK_ELEMS

    def clear(self) -> None:
        self._scratch.clear()

    def scratch(self, dtype: torch.dtype, device: torch.device, count: int, elems: int) -> list[Tensor]:
        """``count`` reusable flat buffers of at least ``elems`` elements (no page faults per step)."""
        key = (dtype, device)
        buf = self._scratch.get(key)
        if buf is None or buf.shape[0] < count or buf.shape[1] < elems:
            rows = max(count, 0 if buf is None else buf.shape[0])
            cols = max(elems, CHUNK_ELEMS, 0 if buf is None else buf.shape[1])
            buf = torch.empty((rows, cols), dtype=dtype, device=device)
            self._scratch[key] = buf
        return [buf[i, :elems] for i in range(count)]


class AdamEager(Eager):
    def prepare(self, items: list[Item]) -> list[tuple[Item, bool]]:
        return [(item, _torch_adamw_fits(item)) for item in items]

    def first(self, batch: list[tuple[Item, bool]], stats: Tensor, switches: Switches) -> None:
        for item, fits in batch:
            s = item.scalars
            if fits and not s.nesterov:  # the kernel has no Nesterov form (a group setting: it may change)
                self._first_torch_adamw(item, stats)
                continue
            f_p, f_g = flat(item.param), flat(item.grad)
            f_m, f_v = flat(item.state["exp_avg"]), flat(item.state["exp_avg_sq"])
            dt = f_m.dtype
            upcast = f_p.dtype != dt
            for seg in item.segments:
                n = seg.rows * seg.row_len
                u, tmp, g_buf, p_buf = self.scratch(dt, f_m.device, 4, n)
                u, tmp = u.view(seg.rows, seg.row_len), tmp.view(seg.rows, seg.row_len)
                g = load_segment(seg_view(f_g, seg), g_buf, seg, upcast, s.maximize)
                m, v = seg_view(f_m, seg), seg_view(f_v, seg)
                m.lerp_(g, 1 - s.beta1)
                v.mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
                p = load_segment(seg_view(f_p, seg), p_buf, seg, upcast, False)
                _direction(u, tmp, m, v, g, s, s.nesterov)  # u = update / sqrt_bc2
                if seg.slot < 0:
                    if s.weight_decay > 0:
                        p.mul_(s.decay)
                    p.add_(u, alpha=-s.step_size * s.sqrt_bc2)
                    if upcast:
                        seg_view(f_p, seg).copy_(p)
                    continue
                projection.write_row_sums(stats[:, seg.stat_row : seg.stat_row + seg.rows], g, p, u, tmp)

    def second(self, batch: list[tuple[Item, bool]], decided: Decided) -> None:
        decay = decided.decay
        for item, fits in batch:
            if not item.slots:
                continue
            s = item.scalars
            coef = decided.coef[item.state["exp_avg"].dtype]
            if fits and not s.nesterov:
                self._second_torch_adamw(item, coef, decay)
                continue
            f_p, f_g = flat(item.param), flat(item.grad)
            f_m, f_v = flat(item.state["exp_avg"]), flat(item.state["exp_avg_sq"])
            dt = f_m.dtype
            upcast = f_p.dtype != dt
            step = -s.step_size * s.sqrt_bc2
            for seg in item.segments:
                if seg.slot < 0:
                    continue
                n = seg.rows * seg.row_len
                u, tmp, g_buf, p_buf = self.scratch(dt, f_m.device, 4, n)
                u, tmp = u.view(seg.rows, seg.row_len), tmp.view(seg.rows, seg.row_len)
                m, v = seg_view(f_m, seg), seg_view(f_v, seg)
                g = load_segment(seg_view(f_g, seg), g_buf, seg, upcast, s.maximize) if s.nesterov else None
                p = load_segment(seg_view(f_p, seg), p_buf, seg, upcast, False)
                _direction(u, tmp, m, v, g, s, s.nesterov)
                # u and the PU sums are both scaled by 1 / sqrt_bc2; the projection is linear in u
                projection.subtract_projection(u, p, coef[seg.stat_row : seg.stat_row + seg.rows], tmp)
                if s.weight_decay > 0:
                    p.mul_(decay[seg.slot])
                p.add_(u, alpha=step)
                if upcast:
                    seg_view(f_p, seg).copy_(p)

    # ----- torch's AdamW kernel applies the step (see the module docstring) -----
    def _first_torch_adamw(self, item: Item, stats: Tensor) -> None:
        s = item.scalars
        f_p, f_g = flat(item.param), flat(item.grad)
        f_m, f_v = flat(item.state["exp_avg"]), flat(item.state["exp_avg_sq"])
        plain = [seg for seg in item.segments if seg.slot < 0]
        if plain:  # never projected: AdamW, weight decay included
            _torch_adamw(item, ([seg_view(t, seg) for seg in plain] for t in (f_p, f_g, f_m, f_v)))
        for seg in item.segments:
            if seg.slot < 0:
                continue
            m_new, u, tmp, g_buf = self.scratch(f_m.dtype, f_m.device, 4, seg.rows * seg.row_len)
            m_new, u, tmp = (t.view(seg.rows, seg.row_len) for t in (m_new, u, tmp))
            g = load_segment(seg_view(f_g, seg), g_buf, seg, False, s.maximize)
            p = seg_view(f_p, seg)
            torch.lerp(seg_view(f_m, seg), g, 1 - s.beta1, out=m_new)
            torch.mul(seg_view(f_v, seg), s.beta2, out=u).addcmul_(g, g, value=1 - s.beta2)
            u.sqrt_().add_(s.eps * s.sqrt_bc2)
            torch.div(m_new, u, out=u)  # the update divided by sqrt_bc2
            projection.write_row_sums(stats[:, seg.stat_row : seg.stat_row + seg.rows], g, p, u, tmp)

    @staticmethod
    def _second_torch_adamw(item: Item, coef: Tensor, decay: Tensor) -> None:
        s = item.scalars
        f_p, f_g = flat(item.param), flat(item.grad)
        f_m, f_v = flat(item.state["exp_avg"]), flat(item.state["exp_avg_sq"])
        # coef is per unit of (update / sqrt_bc2), like the PU sums it came from
        coef_scale = s.step_size * s.sqrt_bc2
        for seg in item.segments:
            if seg.slot < 0:
                continue
            rows = coef[seg.stat_row : seg.stat_row + seg.rows]
            p = seg_view(f_p, seg)
            p.mul_(torch.add(decay[seg.slot], rows, alpha=coef_scale)[:, None])
            _torch_adamw(item, ([seg_view(t, seg)] for t in (f_p, f_g, f_m, f_v)), weight_decay=0.0)


def _torch_adamw_fits(item: Item) -> bool:
    """torch's AdamW kernel can apply this tensor's step (without Nesterov): same dtype for weight, gradient and
    state, and a device the kernel supports."""
    p = item.param
    return (
        p.dtype == item.grad.dtype == item.state["exp_avg"].dtype
        and p.device.type in _TORCH_ADAMW_DEVICES
        and hasattr(torch, "_fused_adamw_")
    )


def _torch_adamw(item: Item, tensors, weight_decay: float | None = None) -> None:
    params, grads, exp_avgs, exp_avg_sqs = tensors
    s = item.scalars
    step = torch.tensor(float(item.state["step"]), dtype=torch.float32, device=item.param.device)
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        [step] * len(params),
        amsgrad=False,
        lr=s.lr,
        beta1=s.beta1,
        beta2=s.beta2,
        eps=s.eps,
        maximize=s.maximize,
        weight_decay=s.weight_decay if weight_decay is None else weight_decay,
    )


def _direction(u: Tensor, tmp: Tensor, m: Tensor, v: Tensor, g: Tensor | None, s, nesterov: bool) -> None:
    """u = Adam's update divided by sqrt(1 - beta2^t): m_hat / (sqrt(v) + eps * sqrt(1 - beta2^t))."""
    torch.sqrt(v, out=u)
    u.add_(s.eps * s.sqrt_bc2)
    if nesterov:
        torch.mul(m, s.beta1, out=tmp)
        tmp.add_(g, alpha=1 - s.beta1)
        torch.div(tmp, u, out=u)
    else:
        torch.div(m, u, out=u)


class SgdEager(Eager):
    def first(self, batch: list[Item], stats: Tensor, switches: Switches) -> None:
        for item in batch:
            s = item.scalars
            f_p, f_g, f_b = flat(item.param), flat(item.grad), flat(item.state["momentum"])
            dt = f_b.dtype
            upcast = f_p.dtype != dt
            for seg in item.segments:
                d_buf, tmp, g_buf, p_buf = self.scratch(dt, f_b.device, 4, seg.rows * seg.row_len)
                g = load_segment(seg_view(f_g, seg), g_buf, seg, upcast, s.maximize)
                b = seg_view(f_b, seg)
                if s.dampening == 0:
                    torch.add(g, b, alpha=s.momentum, out=b)  # one pass instead of two
                else:
                    b.mul_(s.momentum).add_(g, alpha=1 - s.dampening)
                d = _sgd_direction(d_buf, b, g, s, seg)
                p = load_segment(seg_view(f_p, seg), p_buf, seg, upcast, False)
                if seg.slot < 0:
                    if s.weight_decay > 0:
                        p.mul_(s.decay)
                    p.add_(d, alpha=-s.lr)
                    if upcast:
                        seg_view(f_p, seg).copy_(p)
                    continue
                tmp = tmp.view(seg.rows, seg.row_len)
                projection.write_row_sums(stats[:, seg.stat_row : seg.stat_row + seg.rows], g, p, d, tmp)

    def second(self, batch: list[Item], decided: Decided) -> None:
        decay = decided.decay
        for item in batch:
            if not item.slots:
                continue
            s = item.scalars
            f_p, f_g, f_b = flat(item.param), flat(item.grad), flat(item.state["momentum"])
            dt = f_b.dtype
            coef = decided.coef[dt]
            upcast = f_p.dtype != dt
            for seg in item.segments:
                if seg.slot < 0:
                    continue
                d_buf, tmp, g_buf, p_buf = self.scratch(dt, f_b.device, 4, seg.rows * seg.row_len)
                g = load_segment(seg_view(f_g, seg), g_buf, seg, upcast, s.maximize) if s.nesterov else None
                d = _sgd_direction(d_buf, seg_view(f_b, seg), g, s, seg)
                p = load_segment(seg_view(f_p, seg), p_buf, seg, upcast, False)
                tmp = tmp.view(seg.rows, seg.row_len)
                projection.subtract_projection(d, p, coef[seg.stat_row : seg.stat_row + seg.rows], tmp)
                if s.weight_decay > 0:
                    p.mul_(decay[seg.slot])
                p.add_(d, alpha=-s.lr)
                if upcast:
                    seg_view(f_p, seg).copy_(p)


def _sgd_direction(out: Tensor, buf: Tensor, grad: Tensor | None, s, seg) -> Tensor:
    """SGDP's un-projected update: grad + momentum * buf (Nesterov), else the buffer itself."""
    if not s.nesterov:
        return buf
    return torch.add(grad, buf, alpha=s.momentum, out=out.view(seg.rows, seg.row_len))
