"""The reference backend (``foreach=False``): whole tensors, in the reference package's order of operations.

It is the executable specification the other backends are tested against: pass 1 computes the whole update
and keeps it until pass 2 projects it segment by segment.
"""

from __future__ import annotations

from torch import Tensor

from ... import projection
from ..._tensors import compute_copy, flat, seg_view, write_back
from .._step import Decided, Item, Switches
from .base import Backend


class Reference(Backend):
    name = "reference"

    def first(self, batch: list[Item], stats: Tensor, switches: Switches) -> None:
        for item in batch:
            param, grad = compute_copy(item.param), compute_copy(item.grad)
            if item.group["maximize"]:
                grad = -grad
            update = self._update(item, grad)
            if item.slots:
                f_g, f_p, f_u = flat(grad), flat(param), flat(update)
                for seg in item.segments:
                    if seg.slot >= 0:
                        rows = stats[:, seg.stat_row : seg.stat_row + seg.rows]
                        projection.accumulate_row_sums(rows, seg_view(f_g, seg), seg_view(f_p, seg), seg_view(f_u, seg))
                item.extra = dict(param=param, update=update)
                continue
            # never projected: finished now, with the decoupled weight decay
            s = item.scalars
            if s.weight_decay > 0:
                param.mul_(s.decay)
            param.add_(update, alpha=-self._rate(item))
            write_back(item.param, param)

    def second(self, batch: list[Item], decided: Decided) -> None:
        decay = decided.decay
        for item in batch:
            if not item.extra:
                continue
            s = item.scalars
            coef = decided.coef[item.extra["update"].dtype]
            param, update = item.extra["param"], item.extra["update"]
            f_p, f_u = flat(param), flat(update)
            for seg in item.segments:
                p_seg = seg_view(f_p, seg)
                if seg.slot >= 0:
                    rows = coef[seg.stat_row : seg.stat_row + seg.rows]
                    projection.subtract_projection(seg_view(f_u, seg), p_seg, rows)
                if s.weight_decay > 0:
                    p_seg.mul_(decay[seg.slot] if seg.slot >= 0 else s.decay)
            param.add_(update, alpha=-self._rate(item))
            write_back(item.param, param)
            item.extra = {}

    def release(self, batch: list[Item]) -> None:
        for item in batch:
            item.extra = {}

    def _update(self, item: Item, grad: Tensor) -> Tensor:
        raise NotImplementedError

    def _rate(self, item: Item) -> float:
        raise NotImplementedError


class AdamReference(Reference):
    def _update(self, item: Item, grad: Tensor) -> Tensor:
        s = item.scalars
        exp_avg, exp_avg_sq = item.state["exp_avg"], item.state["exp_avg_sq"]
        exp_avg.mul_(s.beta1).add_(grad, alpha=1 - s.beta1)
        exp_avg_sq.mul_(s.beta2).addcmul_(grad, grad, value=1 - s.beta2)
        denom = (exp_avg_sq.sqrt() / s.sqrt_bc2).add_(s.eps)
        if s.nesterov:
            return (s.beta1 * exp_avg + (1 - s.beta1) * grad) / denom
        return exp_avg / denom

    def _rate(self, item: Item) -> float:
        return item.scalars.step_size


class SgdReference(Reference):
    def _update(self, item: Item, grad: Tensor) -> Tensor:
        s = item.scalars
        buf = item.state["momentum"]
        buf.mul_(s.momentum).add_(grad, alpha=1 - s.dampening)
        return grad + s.momentum * buf if s.nesterov else buf  # the buffer itself, as in the reference

    def _rate(self, item: Item) -> float:
        return item.scalars.lr
