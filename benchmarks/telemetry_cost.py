"""What the projection record costs: AdamP steps with the record (the default), without it, and with it
read as a logging step would (``projection_metrics``), interleaved in one process.

    python benchmarks/telemetry_cost.py --model small --rounds 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_time import MODELS

import hf_adamp
from hf_adamp.optim import _engine
from hf_adamp.telemetry import projection_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    params = [(torch.randn(s) * 0.02).requires_grad_() for s in MODELS[args.model]()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = hf_adamp.AdamP(params, lr=1e-7, weight_decay=0.01)
    real_record = _engine.StepRecord

    def no_record(*_args):
        return None

    variants = {
        "with record (default)": lambda: opt.step(),
        "without record": lambda: opt.step(),
        "with record, read (logging step)": lambda: (opt.step(), projection_metrics(opt)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds + 3):
        for name, fn in variants.items():
            _engine.StepRecord = no_record if name == "without record" else real_record
            t0 = time.perf_counter()
            fn()
            if r >= 3:
                times[name].append(time.perf_counter() - t0)
    _engine.StepRecord = real_record
    base = statistics.median(times["without record"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:34s} median {med * 1e3:8.3f} ms   ratio to 'without record' {med / base:.3f}")


if __name__ == "__main__":
    main()
