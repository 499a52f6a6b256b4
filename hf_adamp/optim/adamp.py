"""AdamP: Adam whose update loses its radial component on scale-invariant weights (Heo et al., 2021)."""

from __future__ import annotations

from collections.abc import Iterable

from ._engine import ProjectedOptimizer
from ._validation import check_fused, check_non_negative, check_range
from .rules import AdamRule


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
        foreach: ``None`` or ``True`` for the fast paths, ``False`` for the plain per-tensor (reference) path.
        fused: ``None``: hf_adamp's kernels where they are the default (C++ on CPU); ``True``: demand them (C++ on
            CPU, Triton on CUDA), raising at the first step where they cannot step a tensor; ``False``: never
            (the eager torch path, or the plain one with ``foreach=False``). As torch's optimizers, ``fused``
            and ``foreach`` cannot both be True.

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
        fused: bool | None = None,
    ) -> None:
        check_fused(fused, foreach)
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
            fused=fused,
        )
        super().__init__(params, defaults)

    _RULE = AdamRule()
