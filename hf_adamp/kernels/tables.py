"""The tables the C++ kernels read, declared once for Python: run columns, modes, scalar columns, dtype codes.

``adamp_cpu.cpp`` makes its enums and the text of ``hf_adamp_layout()`` from one list each; the loader compares
that text with ``layout_text()`` below and refuses a library whose tables differ (the eager path, with a warning).
"""

from __future__ import annotations

import torch

# A run in the kernels' (runs, len(RUN_COLUMNS)) int64 table: the tensor set's index in the call, the run's first
# element, its rows and row length, its pass-1 mode, its first statistics row and its parameter slot.
RUN_COLUMNS = ("tensor", "start", "rows", "row_len", "mode", "stat_row", "slot")
RUN_COLS = len(RUN_COLUMNS)
MODE_COLUMN = RUN_COLUMNS.index("mode")

# Pass-1 modes (see hf_adamp.optim.backends.cpu), and the pass-2 mode of each one.
PASS1 = {"first": 0, "full": 1, "spec": 2, "spec_channel": 3}
PASS2 = {"apply": 0, "repair": 1, "repair_channel": 2}
PASS2_OF_PASS1 = {"first": "apply", "spec": "repair", "spec_channel": "repair_channel"}  # full: no pass 2

# A run's row in the (runs, columns) float64 scalar table, per kernel family. "eps_scaled" is eps * sqrt(1 -
# beta2^t), "step_scaled" lr / (1 - beta1^t) * sqrt(1 - beta2^t); flags are 0.0 / 1.0.
SCALAR_COLUMNS = {
    "adam": ("beta1", "beta2", "eps_scaled", "step_scaled", "decay", "eps", "nesterov", "maximize"),
    "sgd": ("momentum", "dampening", "lr", "decay", "eps", "nesterov", "maximize"),
}
# Tensors per parameter in a call: gradient, parameter, then the state tensors.
TENSORS_PER_PARAM = {"adam": 4, "sgd": 3}

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def _listed(pairs) -> str:
    return "".join(f"{name}={value}," for name, value in pairs)


def layout_text() -> str:
    """The declarations above in the form of ``hf_adamp_layout()``."""
    parts = [
        ("runs", _listed((name, i) for i, name in enumerate(RUN_COLUMNS))),
        ("pass1", _listed(PASS1.items())),
        ("pass2", _listed(PASS2.items())),
        *((kind, _listed((name, i) for i, name in enumerate(cols))) for kind, cols in SCALAR_COLUMNS.items()),
        ("dtypes", _listed((_DTYPE_NAMES[dt], code) for dt, code in DTYPE_CODES.items())),
        ("tensors", _listed(TENSORS_PER_PARAM.items())),
    ]
    return ";".join(f"{title}:{body}" for title, body in parts)
