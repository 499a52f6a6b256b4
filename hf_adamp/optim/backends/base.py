"""The contract every backend keeps. A backend steps the tensors the selector gave it, in two passes:

* ``prepare(items)``: once per step context (kept while the tensors stay the same), whatever the backend wants
  to keep about its tensors (the C++ kernels' tables, the Triton runs); returns the backend's batch;
* ``first(batch, stats, switches)``: pass 1 on every tensor: moments, the four row sums of every projectable
  row into ``stats``; finish the tensors that are never projected (and, where a backend may, those whose
  outcome it guesses);
* ``second(batch, decided)``: pass 2 after the decision: project, decay, step.

The engine sets ``item.scalars`` (the step's numbers) before pass 1 and owns everything else: step counts,
the decision, the memory of past outcomes. Backends never import it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .._step import Decided, Item, Switches

WHOLE = 1 << 62  # segment size of backends that take whole pieces


class Backend:
    name = ""
    decides_on_host = False  # offers ``decide`` (the C++ kernels: the decision in one host loop)

    def __init__(self, rule: Any) -> None:
        self.rule = rule

    def segment_elems(self) -> int:
        """The most elements of one segment the engine cuts tensors into for this backend."""
        return WHOLE

    def refusal(self, item: Item, switches: Switches) -> str | None:
        """Why this backend cannot step the tensor (None: it can)."""
        return None

    def prepare(self, items: list[Item]) -> Any:
        return items

    def holds(self, batch: Any) -> bool:
        """The batch still describes its tensors' state (no state tensor was replaced since ``prepare``)."""
        return True

    def first(self, batch: Any, stats: Tensor, switches: Switches) -> None:
        raise NotImplementedError

    def second(self, batch: Any, decided: Decided) -> None:
        raise NotImplementedError

    def release(self, batch: Any) -> None:
        """End of a step: drop what must not outlive it."""

    def clear(self) -> None:
        """Drop cached buffers (the sharding layout changed)."""
