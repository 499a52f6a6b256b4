"""Device check of the GPU (Triton) path of hf_adamp, for a machine with CUDA and triton.

Two parts (exit status 1 if either fails):

a. the checks: ``python -m pytest -m cuda tests/test_cuda.py`` in a subprocess (parity of the Triton path with
   the plain path and the reference ``adamp`` package over every AdamP/SGDP configuration of the tests, fp32,
   bf16 and fp16, long rows, sharded partial rows; steps under ``torch.cuda.set_sync_debug_mode("error")``; no
   kernel recompiled between steps), summed up as one PASS or FAIL line;
b. step time at GPT-2-small shapes, interleaved with torch's fused AdamW and SGD, as ratios.

    python benchmarks/gpu_check.py                # everything (a few minutes at most, compilation included)
    python benchmarks/gpu_check.py --skip-timing  # the checks only

On a machine without CUDA it says so and exits with status 0. ``GPU_CHECK_ON_CPU=1`` runs both parts on CPU
through Triton's interpreter instead (a few checks, tiny timing shapes), to try this script without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/test_cuda.py"
ON_CPU = os.environ.get("GPU_CHECK_ON_CPU") == "1"
# the Triton path is opt-in on CUDA; on CPU tensors it runs under the interpreter only, behind a test switch
OPT_IN_ENV = "HF_ADAMP_TRITON_ON_CPU" if ON_CPU else "HF_ADAMP_TRITON"
# what the interpreter mode needs before python starts: triton reads TRITON_INTERPRET on import
INTERPRETER_ENV = {"TRITON_INTERPRET": "1", "HF_ADAMP_TRITON_ON_CPU": "1", "HF_ADAMP_CUDA_TESTS_ON_CPU": "1"}
INTERPRETER_SUBSET = "fp32 and small and (AdamP-1 or SGDP-4)"  # two quick cases: this mode tries the script

if ON_CPU and any(os.environ.get(k) != v for k, v in INTERPRETER_ENV.items()):  # re-run with it in place
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **INTERPRETER_ENV})

sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import torch  # noqa: E402

import hf_adamp  # noqa: E402

DEV = torch.device("cpu" if ON_CPU else "cuda")


def sync() -> None:
    if not ON_CPU:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- a. checks
def run_checks() -> bool:
    """The cuda tests in a pytest subprocess, its output passed through; True when they all passed."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-m", "cuda", TESTS]
    if ON_CPU:
        cmd += ["-k", INTERPRETER_SUBSET]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ) if ON_CPU else {k: v for k, v in os.environ.items() if k not in INTERPRETER_ENV}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.strip():
            last = line.strip()
    code = proc.wait()
    ok = code == 0 and " passed" in last and "skipped" not in last  # on a GPU, every cuda test runs
    summary = last.strip("= ") or f"pytest exited with status {code}"
    print(f"\n{'PASS' if ok else 'FAIL'}  checks ({TESTS}, -m cuda): {summary}, {time.perf_counter() - t0:.0f} s")
    return ok


# ----------------------------------------------------------------------------------------------- b. timing
@contextlib.contextmanager
def triton_opt_in(on: bool):
    """HF_ADAMP_TRITON set (or unset) while an optimizer is built and steps."""
    before = os.environ.pop(OPT_IN_ENV, None)
    if on:
        os.environ[OPT_IN_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(OPT_IN_ENV, None)
        if before is not None:
            os.environ[OPT_IN_ENV] = before


class HfAdamp:
    """An hf_adamp optimizer built and stepped with the Triton path opted in, or not (the default path)."""

    def __init__(self, make, triton: bool) -> None:
        self.triton = triton
        with triton_opt_in(triton):
            self.opt = make()

    def step(self) -> None:
        with triton_opt_in(self.triton):
            self.opt.step()


def timing(rounds: int, steps: int) -> None:
    from step_time import gpt2_small_shapes

    shapes = gpt2_small_shapes() if not ON_CPU else gpt2_small_shapes(layers=1, width=32, vocab=64, positions=16)
    lr, wd = 1e-3, 0.01
    gen = torch.Generator(device=DEV).manual_seed(0)

    def params():
        ps = [torch.randn(s, device=DEV, generator=gen).requires_grad_() for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, device=DEV, generator=gen) * 1e-2
        return ps

    cands = {
        "hf_adamp.AdamP": lambda: HfAdamp(lambda: hf_adamp.AdamP(params(), lr=lr, weight_decay=wd), triton=True),
        "hf_adamp.SGDP": lambda: HfAdamp(
            lambda: hf_adamp.SGDP(params(), lr=lr, momentum=0.9, weight_decay=wd), triton=True
        ),
        # the default CUDA path: torch ops, torch's fused AdamW inside
        "hf_adamp.AdamP(eager)": lambda: HfAdamp(lambda: hf_adamp.AdamP(params(), lr=lr, weight_decay=wd), False),
        "torch.AdamW(fused)": lambda: torch.optim.AdamW(params(), lr=lr, weight_decay=wd, fused=True),
        "torch.SGD(fused)": lambda: torch.optim.SGD(params(), lr=lr, momentum=0.9, weight_decay=wd, fused=True),
    }
    opts = {name: make() for name, make in cands.items()}
    for opt in opts.values():  # warm-up: state, compilation
        for _ in range(3):
            opt.step()
    sync()
    device_ms: dict[str, list[float]] = {k: [] for k in opts}
    host_ms: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(rounds):  # interleaved: each round times every optimizer once
        for name, opt in opts.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            t1 = time.perf_counter()  # the host is done: launch cost only
            sync()
            t2 = time.perf_counter()
            host_ms[name].append((t1 - t0) / steps * 1e3)
            device_ms[name].append((t2 - t0) / steps * 1e3)
    med = {k: statistics.median(v) for k, v in device_ms.items()}
    print(f"\nGPT-2-small shapes ({len(shapes)} tensors), {rounds} rounds x {steps} steps, median ms/step:")
    print(f"{'optimizer':24s} {'ms/step':>9s} {'host ms':>9s} {'/AdamW(fused)':>14s} {'/SGD(fused)':>12s}")
    for name in opts:
        print(
            f"{name:24s} {med[name]:9.3f} {statistics.median(host_ms[name]):9.3f} "
            f"{med[name] / med['torch.AdamW(fused)']:14.2f} {med[name] / med['torch.SGD(fused)']:12.2f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    args = ap.parse_args()
    if not ON_CPU and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check.")
        return 0
    if importlib.util.find_spec("triton") is None:
        print("gpu_check: triton is not installed here (pip install 'hf-adamp[gpu]').")
        return 1
    import triton

    where = "CPU (Triton interpreter)" if ON_CPU else torch.cuda.get_device_name()
    print(f"gpu_check: {where}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    ok = run_checks()
    if not args.skip_timing:
        timing(args.rounds, args.steps)
    print("\nall checks passed" if ok else "\nthe checks failed (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
