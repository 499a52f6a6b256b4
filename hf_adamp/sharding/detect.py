"""Recognising the tensors sharding engines hand an optimizer, without importing those engines.

A leaf: the optimizers and the engines' adapters both use it.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from torch import Tensor

_DTENSOR_TYPES: dict[type, bool] = {}


def is_dtensor(t: Tensor) -> bool:
    kind = type(t)
    known = _DTENSOR_TYPES.get(kind)
    if known is None:  # by name: DTensor is only importable where torch.distributed is built
        known = _DTENSOR_TYPES[kind] = any(c.__name__ == "DTensor" for c in kind.__mro__)
    return known


def is_sharded_tensor(t: Tensor) -> bool:
    """A tensor that only ever holds a shard: an FSDP2 DTensor, an FSDP1 FlatParameter, or an original parameter
    of FSDP1 with use_orig_params=True (FSDP flags it; between steps it is a 1-D slice of this rank's shard)."""
    if is_dtensor(t) or getattr(t, "_is_flat_param", False):
        return True
    return bool(getattr(t, "_fsdp_flattened", False)) and t.dim() <= 1


class LocalState(MutableMapping):
    """A parameter's state seen through its local shards: DTensor entries read as ``to_local()`` views
    (in-place updates reach the DTensor), writes go to the real state."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def __getitem__(self, key: str) -> Any:
        value = self._state[key]
        return value.to_local() if isinstance(value, Tensor) and is_dtensor(value) else value

    def __setitem__(self, key: str, value: Any) -> None:
        self._state[key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)
