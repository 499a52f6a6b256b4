"""Time one optimizer step of hf_adamp against torch and the reference packages.

All optimizers share the same parameters and gradients and are stepped in turn, round after round (in a new random
order each round, with the caches flushed before each step), in one process, so that machine noise hits them alike.
Prints the median step time, its ratio to torch's AdamW (for-loop and fused) and SGD, and the peak memory a step adds
on top of what was resident before it (Linux: VmHWM after clearing it). ``--twins`` adds a second fused AdamW and SGD,
whose ratios to the first show how far two identical optimizers differ here.

    python benchmarks/step_time.py --model gpt2-small --rounds 15
    python benchmarks/step_time.py --model small --only adamp,adamw
    python benchmarks/step_time.py --only "adamw(fused),sgd(fused),hf_adamp.adamp,hf_adamp.sgdp" --skip plain
    python benchmarks/step_time.py --grads orthogonal --only "fused),hf_adamp.adamp,hf_adamp.sgdp" --skip plain
    python benchmarks/step_time.py --grads real --only "fused),hf_adamp.adamp,hf_adamp.sgdp" --skip plain

Gradients are fixed random tensors (``--grads random``: independent of the weights, so each matrix passes the
layer test with a probability of about 8% at every step: 6-9 matrices take the layer projection, and they change
from step to step), or are made orthogonal to every row of their weight (``--grads orthogonal``: the
scale-invariant case, where every matrix takes the channel projection), or come from one real backward pass
(``--grads real``: a randomly initialised transformers GPT-2 of the model's shapes on random tokens; its own
parameters are stepped; 1-2 matrices take the layer projection).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from collections.abc import Callable

import torch

import hf_adamp
from hf_adamp.optim._engine import ProjectedOptimizer


def gpt2_small_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, positions: int = 1024) -> list[tuple]:
    """The 148 parameter shapes of GPT-2 small (124M parameters), Conv1D weights stored [in, out]."""
    shapes: list[tuple] = [(vocab, width), (positions, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return shapes + [(width,), (width,)]


MODELS = {
    "gpt2-small": gpt2_small_shapes,
    "small": lambda: gpt2_small_shapes(layers=4, width=256, vocab=8000, positions=256),
}
GPT2_CONFIGS = {"gpt2-small": {}, "small": dict(n_layer=4, n_embd=256, vocab_size=8000, n_positions=256)}


def real_gradients(model_name: str, batch: int = 4, length: int = 128) -> list[torch.Tensor]:
    """The parameters of a randomly initialised GPT-2, with the gradients of one language-model loss on them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**GPT2_CONFIGS[model_name]))
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    model(ids, labels=ids).loss.backward()
    return [p for p in model.parameters()]


def candidates(params: list[torch.Tensor], lr: float) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    wd = 0.01
    out: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "hf_adamp.AdamP": lambda: hf_adamp.AdamP(params, lr=lr, weight_decay=wd),
        "hf_adamp.AdamP(plain)": lambda: hf_adamp.AdamP(params, lr=lr, weight_decay=wd, foreach=False),
        "hf_adamp.SGDP": lambda: hf_adamp.SGDP(params, lr=lr, momentum=0.9, weight_decay=wd),
        # delta=0 never projects: the step's cost when no tensor needs the second pass of an exact projection
        "hf_adamp.AdamP(delta=0)": lambda: hf_adamp.AdamP(params, lr=lr, weight_decay=wd, delta=0.0),
        "hf_adamp.SGDP(delta=0)": lambda: hf_adamp.SGDP(params, lr=lr, momentum=0.9, weight_decay=wd, delta=0.0),
        "hf_adamp.RAdam": lambda: hf_adamp.RAdam(params, lr=lr, weight_decay=wd),
        "torch.AdamW(for-loop)": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False),
        "torch.AdamW(foreach)": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True),
        "torch.AdamW(fused)": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True),
        "torch.SGD(for-loop)": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, foreach=False),
        "torch.SGD(foreach)": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, foreach=True),
        "torch.SGD(fused)": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, fused=True),
        "torch.RAdam": lambda: torch.optim.RAdam(params, lr=lr, weight_decay=wd),
    }
    try:
        import adamp

        out["adamp.AdamP"] = lambda: adamp.AdamP(params, lr=lr, weight_decay=wd)
        out["adamp.SGDP"] = lambda: adamp.SGDP(params, lr=lr, momentum=0.9, weight_decay=wd)
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        out["pytorch_optimizer.AdamP"] = lambda: pytorch_optimizer.AdamP(params, lr=lr, weight_decay=wd)
    except ImportError:
        pass
    return out


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed_step(opt: torch.optim.Optimizer) -> tuple[float, float | None]:
    """Seconds for one step, and the peak resident memory it added (MB), where Linux tells."""
    measure = _reset_peak()
    before = _status_kb("VmRSS:") if measure else None
    t0 = time.perf_counter()
    opt.step()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM:") if measure else None
    extra = (peak - before) / 1024 if before is not None and peak is not None else None
    return dt, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2-small")
    ap.add_argument("--rounds", type=int, default=11, help="timed rounds (after 2 warm-up rounds)")
    ap.add_argument("--only", default="", help="comma-separated substrings; keep optimizers whose name has one")
    ap.add_argument("--skip", default="", help="comma-separated substrings; drop optimizers whose name has one")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--flush-mb", type=int, default=64, help="MB written before each step to flush the caches (0: off)")
    ap.add_argument(
        "--twins", action="store_true", help="add a second fused AdamW and SGD: their ratio to the first is the noise"
    )
    grads = ("random", "orthogonal", "real")
    ap.add_argument("--grads", choices=grads, default="random", help="see the module docstring")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.grads == "real":
        params = real_gradients(args.model)
    else:
        params = [torch.randn(s) * 0.02 for s in MODELS[args.model]()]
    for p in params:
        if args.grads == "real":
            continue
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 1e-3
        if args.grads == "orthogonal" and p.dim() > 1:  # orthogonal to each row: a scale-invariant weight
            w, g = p.detach().reshape(p.shape[0], -1), p.grad.view(p.shape[0], -1)
            g -= w * (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)
    n = sum(p.numel() for p in params)
    print(
        f"model {args.model}: {len(params)} tensors, {n / 1e6:.1f}M parameters; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, {args.grads} gradients, load average "
        f"{os.getloadavg()[0]:.1f}"
    )

    makers = candidates(params, lr=1e-7)
    if args.twins:
        for name in ("torch.AdamW(fused)", "torch.SGD(fused)"):
            makers[name + "#2"] = makers[name]
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        makers = {name: m for name, m in makers.items() if any(k in name.lower() for k in keys)}
    if args.skip:
        drop = [k.strip().lower() for k in args.skip.split(",") if k.strip()]
        makers = {name: m for name, m in makers.items() if not any(k in name.lower() for k in drop)}
    opts = {name: make() for name, make in makers.items()}
    times: dict[str, list[float]] = {name: [] for name in opts}
    mem: dict[str, list[float]] = {name: [] for name in opts}
    first: dict[str, float] = {}
    order, shuffle = list(opts), random.Random(0)
    flush = torch.empty(args.flush_mb << 18) if args.flush_mb > 0 else None
    for r in range(args.rounds + 2):
        # A step is slowed by the one before it (the reference packages allocate and free hundreds of MB per step),
        # so each step gets a new predecessor every round (a rotation would keep them) and starts from flushed caches.
        shuffle.shuffle(order)
        for name in order:
            opt = opts[name]
            gc.collect()
            if flush is not None:
                flush.fill_(r)
            dt, extra = timed_step(opt)
            if r == 0:
                first[name] = dt
            if r >= 2:
                times[name].append(dt)
                if extra is not None:
                    mem[name].append(extra)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref_loop = med.get("torch.AdamW(for-loop)")
    ref_fused = med.get("torch.AdamW(fused)")
    ref_sgd = med.get("torch.SGD(for-loop)")
    ref_sgd_fused = med.get("torch.SGD(fused)")
    header = f"{'optimizer':26s} {'median ms':>10s} {'first ms':>9s} {'/AdamW loop':>11s} {'/AdamW fused':>12s}"
    print(header + f" {'/SGD loop':>9s} {'/SGD fused':>10s} {'peak +MB':>9s}")
    for name, t in med.items():
        cols = [f"{t / ref:11.2f}" if ref else f"{'-':>11s}" for ref in (ref_loop, ref_fused)]
        cols += [f"{t / ref:9.2f}" if ref else f"{'-':>9s}" for ref in (ref_sgd,)]
        cols += [f"{t / ref:10.2f}" if ref else f"{'-':>10s}" for ref in (ref_sgd_fused,)]
        peak = f"{max(mem[name]):9.0f}" if mem[name] else f"{'-':>9s}"
        print(f"{name:26s} {t * 1e3:10.1f} {first[name] * 1e3:9.1f} {' '.join(cols)} {peak}")
    # Paired ratios: the median over rounds of the step's time over the reference's in the same round. Machine
    # noise that lasts a few seconds slows both alike, but each keeps its own predecessor's cost (the order is random)
    refs = (("torch.AdamW(fused)", "AdamW fused"), ("torch.SGD(fused)", "SGD fused"))
    pairs = [(ref, label) for ref, label in refs if ref in times]
    if pairs:
        print("paired ratios (median over rounds of the same round's ratio): " + ", ".join(label for _, label in pairs))
        for name in times:
            ratios = [statistics.median(a / b for a, b in zip(times[name], times[ref])) for ref, _ in pairs]
            print(f"  {name:26s} " + " ".join(f"{r:6.3f}" for r in ratios))
    for name, opt in opts.items():
        if isinstance(opt, ProjectedOptimizer):
            kinds = list(opt.projection_decisions().values())
            counts = {k: kinds.count(k) for k in ("channel", "layer", "none")}
            print(f"{name}: last step's projections {counts}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
