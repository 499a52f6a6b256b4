"""Device check of the GPU (Triton) path of hf_adamp's fused step, for a machine with CUDA and triton.

Three parts, each printing PASS/FAIL lines (exit status 1 if any fails):

a. parity: the Triton path against the plain path (``foreach=False``) and the reference ``adamp`` package,
   fp32, on shapes whose forced gradients take all three projection outcomes; a bf16 run against the plain
   path; long rows (one row of 3M elements) through the partial sums; two simulated ranks whose shards cut
   rows;
b. no host sync: steps under ``torch.cuda.set_sync_debug_mode("error")`` (after warm-up steps that compile
   the kernels), and no kernel recompiled from one step to the next;
c. step time at GPT-2-small shapes, interleaved with torch's fused AdamW and SGD, as ratios.

    python benchmarks/gpu_check.py                # everything (a few minutes at most, compilation included)
    python benchmarks/gpu_check.py --skip-timing  # a and b only

On a machine without CUDA it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

os.environ.setdefault("HF_ADAMP_TRITON", "1")  # the CUDA path checked here is opt-in for users
import hf_adamp  # noqa: E402
from hf_adamp import kernels  # noqa: E402
from hf_adamp.optim import _triton  # noqa: E402

FAILURES: list[str] = []
DEV = torch.device("cuda")
# Development switch: run the script's logic on CPU tensors through Triton's interpreter (slow; no sync check,
# tiny timing shapes). Needs TRITON_INTERPRET=1 and HF_ADAMP_TRITON_ON_CPU=1 set before python starts.
ON_CPU = os.environ.get("GPU_CHECK_ON_CPU") == "1"
MODES = ("channel", "layer", "none", "random")
# 1-D, 2-D, conv, one row, one column, rows longer than a block, a wide row, an embedding-like matrix
SHAPES = [(6,), (7, 5), (4, 3, 3, 3), (1, 40), (9, 1), (3, 3000), (16, 24), (1, 70_000), (512, 768)]
CONFIGS = [
    ("AdamP", dict(lr=1e-2)),
    ("AdamP", dict(lr=1e-2, weight_decay=0.1, nesterov=True)),
    ("AdamP", dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.05, delta=0.2, wd_ratio=0.5, eps=1e-6)),
    ("SGDP", dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
    ("SGDP", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGDP", dict(lr=1e-2, momentum=0.5, dampening=0.3, weight_decay=1e-3)),
]
if ON_CPU:  # the interpreter is slow: the small shapes only
    SHAPES = SHAPES[:7]
TOL = 1e-6  # fp32, relative to the largest weight, as in the CPU tests


def sync() -> None:
    if not ON_CPU:
        torch.cuda.synchronize()


def report(ok: bool, what: str) -> None:
    print(("PASS  " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def forced(p: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """tests/helpers.forced_grad on a CPU copy (its generator is a CPU one), moved to p's device."""
    from helpers import forced_grad

    return forced_grad(p.detach().float().cpu(), mode, gen).to(p.device, p.dtype)


class LaunchCount:
    """Counts launches through the Triton glue, so that a check can tell the path was taken. Launches are
    serialised (the simulated ranks are threads, and Triton's interpreter is not thread-safe)."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()
        module = _triton._module
        for name in ("adam_first", "adam_second", "sgd_first", "sgd_second"):
            setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, fn):
        def wrapped(*args):
            with self.lock:
                self.n += 1
                return fn(*args)

        return wrapped


class ThreadReducer:
    """All-reduce (sum) of the statistics buffer between simulated ranks that are threads of this process."""

    def __init__(self, ranks: int) -> None:
        self.bufs: list[torch.Tensor | None] = [None] * ranks
        self.barrier = threading.Barrier(ranks, timeout=120)  # a rank that failed must not hang the rest

    def for_rank(self, rank: int):
        def reduce(stats: torch.Tensor) -> None:
            self.bufs[rank] = stats.clone()
            self.barrier.wait()
            total = sum(self.bufs)
            self.barrier.wait()
            stats.copy_(total)

        return reduce


# ----------------------------------------------------------------------------------------------- a. parity
def parity(count: LaunchCount) -> None:
    try:
        import adamp
    except ImportError:
        adamp = None
        print("adamp (the reference package) is not installed: comparing with the plain path only")

    for name, kwargs in CONFIGS:
        base = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
        sets = [[p.to(DEV).clone().requires_grad_() for p in base] for _ in range(3)]
        opts = [
            getattr(hf_adamp, name)(sets[0], **kwargs),
            getattr(hf_adamp, name)(sets[1], foreach=False, **kwargs),
            getattr(adamp, name)(sets[2], **kwargs)
            if adamp
            else getattr(hf_adamp, name)(sets[2], foreach=False, **kwargs),
        ]
        gen = torch.Generator().manual_seed(1)
        seen: set[str] = set()
        agree = True
        before = count.n
        for step in range(16):
            for ps in zip(*sets):
                g = forced(ps[0], MODES[step % 4], gen)
                for p in ps:
                    p.grad = g.clone()
            for opt in opts:
                opt.step()
            ours, plain = opts[0].projection_decisions(), opts[1].projection_decisions()
            agree &= list(ours.values()) == list(plain.values())
            seen |= set(ours.values())
        err_plain = max(rel(a, b) for a, b in zip(sets[0], sets[1]))
        err_ref = max(rel(a, c) for a, c in zip(sets[0], sets[2]))
        ok = err_plain <= TOL and err_ref <= TOL and agree and seen == {"channel", "layer", "none"}
        ok &= count.n > before
        report(ok, f"parity {name} {kwargs}: vs plain {err_plain:.1e}, vs adamp {err_ref:.1e}, outcomes {sorted(seen)}")

    # bf16 weights: each step at most one rounding from the plain path's (weights re-synchronised)
    for name, kwargs in (CONFIGS[1], CONFIGS[3]):
        base = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
        plain, fast = ([p.to(DEV, torch.bfloat16).clone().requires_grad_() for p in base] for _ in range(2))
        opts = [getattr(hf_adamp, name)(plain, foreach=False, **kwargs), getattr(hf_adamp, name)(fast, **kwargs)]
        gen = torch.Generator().manual_seed(2)
        worst = 0.0
        for step in range(8):
            for a, b in zip(plain, fast):
                a.grad = forced(a, MODES[step % 4], gen)
                b.grad = a.grad.clone()
            for opt in opts:
                opt.step()
            for a, b in zip(plain, fast):
                x, y = a.detach().float(), b.detach().float()
                worst = max(worst, ((x - y).abs() / x.abs().clamp_min(1e-30)).max().item())
                b.data.copy_(a.data)
        report(worst <= 2 * 2.0**-8, f"bf16 {name}: worst per-step difference {worst:.1e} (two bf16 ulps: 7.8e-03)")

    # two ranks whose shards cut rows (as tests/test_fused.py builds them), sums reduced between threads
    from hf_adamp.sharding import Layout, ParamSpec, Piece

    shapes = [(7, 5), (6,), (16, 24), (3, 300), (4, 3, 3, 3), (9,)]
    specs = [ParamSpec(s, name=f"p{i}") for i, s in enumerate(shapes)]
    offsets = [sum(sp.numel for sp in specs[:i]) for i in range(len(specs))]
    total = sum(sp.numel for sp in specs)
    edges = [0, 41 + 3 * 24 + 10, 41 + 384 + 450, total]  # cuts inside a row of (16, 24) and of (3, 300)
    for name, kwargs in (CONFIGS[1], CONFIGS[3]):
        base = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
        ref = [p.to(DEV).clone().requires_grad_() for p in base]
        ref_opt = getattr(hf_adamp, name)(ref, foreach=False, **kwargs)
        full = torch.cat([p.reshape(-1) for p in base]).to(DEV)
        reducer = ThreadReducer(len(edges) - 1)
        locals_, opts = [], []
        for rank, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            pieces = []
            for i, sp in enumerate(specs):
                a, b = max(lo, offsets[i]), min(hi, offsets[i] + sp.numel)
                if a < b:
                    pieces.append(Piece(i, a - lo, a - offsets[i], b - a))
            local = full[lo:hi].clone().requires_grad_()
            opt = getattr(hf_adamp, name)([local], **kwargs)
            opt.attach_layout(Layout(specs, {id(local): pieces}), reducer.for_rank(rank))
            locals_.append((local, lo, hi))
            opts.append(opt)
        gen = torch.Generator().manual_seed(3)
        for step in range(12):
            grads = [forced(p, MODES[step % 4], gen) for p in ref]
            for p, g in zip(ref, grads):
                p.grad = g.clone()
            flat_grad = torch.cat([g.reshape(-1) for g in grads])
            for local, lo, hi in locals_:
                local.grad = flat_grad[lo:hi].clone()
            threads = [threading.Thread(target=opt.step) for opt in opts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ref_opt.step()
        ours = torch.cat([x.detach() for x, _, _ in locals_])
        err = rel(ours, torch.cat([p.detach().reshape(-1) for p in ref]))
        report(err <= TOL, f"sharded partial rows {name} (3 ranks): vs unsharded plain path {err:.1e}")


# --------------------------------------------------------------------------------------------- b. no sync
def compiled_variants() -> int | None:
    """How many kernel variants triton has compiled so far (None where this triton keeps them elsewhere)."""
    from hf_adamp.kernels import triton_step

    total = 0
    try:
        for fn in (triton_step._adam_first, triton_step._adam_second, triton_step._sgd_first,
                   triton_step._sgd_second, triton_step._reduce_partials):  # fmt: skip
            for cache in fn.device_caches.values():
                total += len(cache[0])
    except (AttributeError, TypeError, IndexError):
        return None
    return total


def no_sync(count: LaunchCount) -> None:
    for name, kwargs in (CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[4]):
        ps = [torch.randn(s, device=DEV).requires_grad_() for s in SHAPES]
        opt = getattr(hf_adamp, name)(ps, **kwargs)
        gen = torch.Generator().manual_seed(5)
        grads = [[forced(p, MODES[k % 4], gen) for p in ps] for k in range(8)]
        for k in range(3):  # warm-up: compilation, state creation
            for p, g in zip(ps, grads[k]):
                p.grad = g
            opt.step()
        sync()
        variants, before = compiled_variants(), count.n
        error = None
        if not ON_CPU:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for k in range(3, 8):  # lr changes every step: floats must not recompile
                for group in opt.param_groups:
                    group["lr"] *= 0.9
                for p, g in zip(ps, grads[k]):
                    p.grad = g
                opt.step()
        except RuntimeError as exc:
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            traceback.print_exc()
        finally:
            if not ON_CPU:
                torch.cuda.set_sync_debug_mode(0)
        sync()
        what = f"no host sync in 5 steps of {name} {kwargs}" + (f": {error}" if error else "")
        report(error is None and count.n > before, what)
        after = compiled_variants()
        if variants is not None:
            report(after == variants, f"no recompilation across steps of {name}: {variants} -> {after} variants")


# ----------------------------------------------------------------------------------------------- c. timing
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

    def eager(opt):  # hf_adamp's own fast path without the Triton kernels (torch ops, fused AdamW inside)
        class Eager:
            def step(self):
                os.environ[kernels.DISABLE_ENV] = "1"
                try:
                    opt.step()
                finally:
                    os.environ.pop(kernels.DISABLE_ENV, None)

        return Eager()

    cands = {
        "hf_adamp.AdamP": lambda: hf_adamp.AdamP(params(), lr=lr, weight_decay=wd),
        "hf_adamp.SGDP": lambda: hf_adamp.SGDP(params(), lr=lr, momentum=0.9, weight_decay=wd),
        "hf_adamp.AdamP(eager)": lambda: eager(hf_adamp.AdamP(params(), lr=lr, weight_decay=wd)),
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
    for _ in range(rounds):
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
    global DEV
    if ON_CPU:
        DEV = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check.")
        return 0
    if kernels.disabled_by_env():
        print(f"gpu_check: {kernels.DISABLE_ENV} is set, which turns the Triton path off; unset it.")
        return 1
    if not _triton.available():
        print("gpu_check: triton does not import here (pip install 'hf-adamp[gpu]'); see the warning above.")
        return 1
    import triton

    where = "CPU (Triton interpreter)" if ON_CPU else torch.cuda.get_device_name()
    print(f"gpu_check: {where}, torch {torch.__version__}, triton {triton.__version__}")
    count = LaunchCount()
    t0 = time.perf_counter()
    parity(count)
    no_sync(count)
    print(f"checks took {time.perf_counter() - t0:.0f} s (compilation included)")
    if not args.skip_timing:
        timing(args.rounds, args.steps)
    print(f"\n{len(FAILURES)} check(s) failed" if FAILURES else "\nall checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
