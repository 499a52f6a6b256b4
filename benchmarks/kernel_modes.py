"""Time the fused CPU kernels' pass 1 on one matrix, per mode, against torch's fused step on the same tensor.

One (rows, cols) fp32 matrix; the kernels are called directly (one run, the mode forced), so this isolates
the cost of each mode from the rest of a step: ``spec`` (one pass, guessed unprojected), ``spec_channel``
(one pass, each row projected while in cache), ``first`` (pass 1 of two: moments and row sums only), and pass 2:
``apply`` (after ``first``) and ``repair`` (every row of a wrong "not projected" guess, layer-projected). Interleaved
rounds in one process; medians.

    python benchmarks/kernel_modes.py --shape 768x3072
    python benchmarks/kernel_modes.py --shape 3072x768 --rounds 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_adamp import kernels
from hf_adamp.optim.backends import cpu as cpu_backend

LR, DECAY = 1e-7, 0.999


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="768x3072", help="rows x cols")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    rows, cols = (int(x) for x in args.shape.lower().split("x"))
    if not kernels.available():
        raise SystemExit("the fused kernels are unavailable here (no C++ compiler, or HF_ADAMP_DISABLE_FUSED=1)")
    module = kernels.module()

    torch.manual_seed(0)
    p = torch.randn(rows, cols) * 0.02
    p.grad = torch.randn(rows, cols) * 1e-3
    buf, m, v = (torch.zeros(rows, cols) for _ in range(3))
    stats, spec_coef = torch.zeros(4, rows), torch.zeros(rows)
    # pass 2 after a wrong guess of "not projected": every row layer-projected, with the projected decay
    coef, decay = torch.full((rows,), 1e-3), torch.tensor([DECAY + 1e-4], dtype=torch.float64)

    def kernel(kind: str, mode: int, second: bool = False):
        runs = torch.tensor([[0, 0, rows, cols, mode, 0, 0]], dtype=torch.int64)
        if kind == "sgd":  # momentum, dampening, lr, decay, eps, nesterov, maximize
            scalars = torch.tensor([[0.9, 0.0, LR, DECAY, 1e-8, 0.0, 0.0]], dtype=torch.float64)
            tensors = [p.grad, p, buf]
        else:  # beta1, beta2, eps * sqrt(bc2), lr / bc1 * sqrt(bc2), decay, eps, nesterov, maximize
            scalars = torch.tensor([[0.9, 0.999, 1e-8, LR, DECAY, 1e-8, 0.0, 0.0]], dtype=torch.float64)
            tensors = [p.grad, p, m, v]
        if second:
            launch = getattr(module, kind + "_second")
            return lambda: launch(tensors, runs, scalars, coef, spec_coef, decay)
        launch = getattr(module, kind + "_first")
        return lambda: launch(tensors, runs, scalars, stats, spec_coef)

    sgd = torch.optim.SGD([p], lr=LR, momentum=0.9, weight_decay=1e-3, fused=True)
    adamw = torch.optim.AdamW([p], lr=LR, weight_decay=1e-3, fused=True)
    pass1 = (("spec", cpu_backend.SPEC), ("spec_channel", cpu_backend.SPEC_CHANNEL), ("first", cpu_backend.FIRST))
    pass2 = (("apply", cpu_backend.APPLY), ("repair", cpu_backend.REPAIR))
    cases = {}
    for label, kind, ref, ref_step in (("SGDP", "sgd", "SGD", sgd.step), ("AdamP", "adam", "AdamW", adamw.step)):
        cases.update({f"{label} {mode_name}": kernel(kind, mode) for mode_name, mode in pass1})
        cases.update({f"{label} {mode_name}": kernel(kind, mode, second=True) for mode_name, mode in pass2})
        cases[f"torch {ref}(fused)"] = ref_step
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds + 5):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if r >= 5:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{rows}x{cols} fp32, {torch.get_num_threads()} threads, medians of {args.rounds} rounds; ratio to torch's")
    for name, t in med.items():
        ref = med["torch SGD(fused)" if name.startswith(("SGDP", "torch SGD")) else "torch AdamW(fused)"]
        print(f"  {name:20s} {t * 1e3:8.2f} ms  {t / ref:6.2f}")


if __name__ == "__main__":
    main()
