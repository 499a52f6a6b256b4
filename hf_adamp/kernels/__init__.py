"""Fused CPU kernels of the AdamP and SGDP steps, JIT-built with torch's C++ extension tools on first use.

The build is cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), so only the first process on a machine pays for it (about a minute). Where
no C++ compiler is found, or the build fails, or ``HF_ADAMP_DISABLE_FUSED=1`` is set, ``available()`` is
False, one log line says why, and the optimizers use their eager (chunked torch ops) path.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

DISABLE_ENV = "HF_ADAMP_DISABLE_FUSED"
_SOURCE = Path(__file__).with_name("adamp_cpu.cpp")
_module: ModuleType | None = None
_failed: str | None = None  # why the kernels are unavailable, once known
build_seconds: float | None = None  # wall time of the load in this process (build, or load from cache)


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _cpu_flags() -> list[str]:
    """-mavx2 -mfma where this CPU has them (they double the vector width over the x86-64 baseline)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    words = set(info.split())
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= words else []


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    flags = _cpu_flags()
    # The name carries the ISA flags: a cache directory shared by different machines never mixes builds.
    name = "hf_adamp_cpu_v3" + ("_avx2" if flags else "")
    return cpp_extension.load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *flags],
        extra_ldflags=["-fopenmp"],
        with_cuda=False,
        verbose=False,
    )


def available() -> bool:
    """True when the fused kernels can be used; builds (or loads the cached build) on the first call."""
    global _module, _failed, build_seconds
    if disabled_by_env():
        return False
    if _module is not None:
        return True
    if _failed is not None:
        return False
    if _compiler() is None:
        _failed = "no C++ compiler found"
    else:
        t0 = time.perf_counter()
        try:
            _module = _build()
            build_seconds = time.perf_counter() - t0
            return True
        except Exception as exc:  # any build or load failure means: use the eager path
            last = (str(exc).strip().splitlines() or [""])[-1]
            _failed = f"build failed ({type(exc).__name__}: {last})"
    logger.warning("hf_adamp: fused CPU kernels unavailable (%s); using the eager path", _failed)
    return False


def module() -> ModuleType:
    """The compiled module; only call after ``available()`` returned True."""
    assert _module is not None, "hf_adamp.kernels.available() must be called first"
    return _module


def reset() -> None:
    """Forget a failed build, so the next ``available()`` tries again (tests)."""
    global _failed
    _failed = None
