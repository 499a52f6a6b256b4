"""RAdam (Liu et al., 2020), as torch.optim.RAdam with the paper code's decoupled weight decay.

torch's RAdam is multi-tensor and purely element-wise, so it is already exact on any shard: this class
only changes a default. Differences from the authors' ``RAdam`` class (``degenerated_to_sgd=True``):

* the adaptive step is taken when ``rho_t > 5``; the authors' code takes it when ``N_sma >= 5``. The two
  differ only if ``rho_t`` is exactly 5, which no (beta2, step) pair in practical use gives;
* before that, both take an SGD-with-momentum step ``lr * m_hat`` (the authors' ``degenerated_to_sgd=True``).
  The authors' ``degenerated_to_sgd=False`` skips those steps entirely (weight decay too); torch has no
  such switch, and neither does this class;
* weight decay is ``p *= 1 - lr * weight_decay`` before the update, as in the authors' code, when
  ``decoupled_weight_decay=True`` (the default here; torch's default is L2 regularisation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RAdam(torch.optim.RAdam):
    """torch.optim.RAdam with ``decoupled_weight_decay=True`` by default. All other arguments are torch's."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            **kwargs,
        )

    def __setstate__(self, state: dict) -> None:
        # a group saved without the key (the authors' code, older torch) takes this optimizer's default, not
        # torch's L2 default, so weight decay stays decoupled after a resume
        defaults = state.get("defaults") or getattr(self, "defaults", {})
        decoupled = defaults.get("decoupled_weight_decay", True)
        for group in state.get("param_groups", ()):
            group.setdefault("decoupled_weight_decay", decoupled)
        super().__setstate__(state)
