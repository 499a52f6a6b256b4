"""The backends that step tensors, and the one function that chooses a tensor's backend.

* ``reference``: whole tensors in the reference package's order of operations (``foreach=False``), the
  executable specification;
* ``eager``: the same maths in cache-sized chunks of torch ops (AdamP may let torch's own AdamW kernel apply
  the step);
* ``cpu``: hf_adamp's C++ kernels (CPU tensors), all tensors of a step in one call per pass;
* ``triton``: hf_adamp's Triton kernels (CUDA tensors; opt-in).

``select_backend`` decides from the constructor's flags first (``fused``, ``foreach``, in each parameter group),
the environment second (``Switches``), and raises where ``fused=True`` asks for kernels that cannot step the
tensor, as torch's optimizers do.
"""

from __future__ import annotations

from typing import Any

from .._step import Item, Switches
from .base import Backend
from .cpu import CpuKernels
from .eager import AdamEager, SgdEager
from .reference import AdamReference, SgdReference
from .triton import TritonKernels

_VARIANTS = {
    "adam": {"reference": AdamReference, "eager": AdamEager},
    "sgd": {"reference": SgdReference, "eager": SgdEager},
}


class KernelsUnavailableError(RuntimeError):
    """``fused=True`` asked for hf_adamp's kernels where they cannot step a tensor."""


def create(rule: Any) -> dict[str, Backend]:
    """One instance of every backend for an optimizer of ``rule`` (they keep the optimizer's scratch buffers)."""
    variants = _VARIANTS[rule.kernels]
    return {
        "reference": variants["reference"](rule),
        "eager": variants["eager"](rule),
        "cpu": CpuKernels(rule),
        "triton": TritonKernels(rule),
    }


def select_backend(item: Item, switches: Switches, backends: dict[str, Backend], owner: str = "") -> Backend:
    """The backend that steps ``item`` (its local tensor, gradient, state and group).

    ``fused=False``: never hf_adamp's kernels (``foreach=False``: reference, else eager). ``fused=True``: the
    kernels of the tensor's device (C++ on CPU, Triton on CUDA), or ``KernelsUnavailableError``. ``fused=None``:
    ``foreach=False`` gives the reference; else the Triton kernels where wanted (``HF_ADAMP_TRITON=1`` on CUDA,
    the interpreter switch on CPU), the C++ kernels on CPU, else eager (``HF_ADAMP_DISABLE_FUSED=1`` turns both
    kernels off).
    """
    group = item.group
    fused = group.get("fused")
    foreach = group.get("foreach")
    if fused is False or (fused is None and foreach is False):
        return backends["reference" if foreach is False else "eager"]
    device = item.param.device.type
    reasons = []
    if device == "cuda" and (fused or switches.triton_opt_in) or device == "cpu" and switches.triton_on_cpu:
        reason = backends["triton"].refusal(item, switches)
        if reason is None:
            return backends["triton"]
        reasons.append(reason)
    if device == "cpu":
        reason = backends["cpu"].refusal(item, switches)
        if reason is None:
            return backends["cpu"]
        reasons.append(reason)
    if fused:
        why = "; ".join(reasons) or f"hf_adamp has no kernels for {device} tensors"
        raise KernelsUnavailableError(
            f"{owner or 'hf_adamp'}: fused=True, but hf_adamp's kernels cannot step a {item.param.dtype} tensor of "
            f"shape {tuple(item.param.shape)} on {item.param.device}: {why}. Use fused=None (the default) for the "
            "fastest available path, or fused=False for the eager one."
        )
    return backends["eager"]


__all__ = ["Backend", "KernelsUnavailableError", "Switches", "create", "select_backend"]
