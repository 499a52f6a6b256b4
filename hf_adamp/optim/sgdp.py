"""SGDP: SGD with momentum whose update loses its radial component on scale-invariant weights."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch.optim.optimizer import required

from ._engine import ProjectedOptimizer
from ._validation import check_fused, check_non_negative, check_range
from .rules import SgdRule


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
        maximize, foreach, fused: as for :class:`hf_adamp.AdamP`.

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
        fused: bool | None = None,
    ) -> None:
        check_fused(fused, foreach)
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
            fused=fused,
        )
        super().__init__(params, defaults)

    _RULE = SgdRule()
