"""Time the optimizer step under DeepSpeed ZeRO-2 with CPU optimizer offload, on 2 CPU ranks (gloo).

Launches its own ranks (``DS_ACCELERATOR=cpu``). Every rank builds one DeepSpeed engine per optimizer
(``offload_optimizer: {device: cpu}``, ``zero_force_ds_cpu_optimizer: false``, fp32, gradient clipping set
explicitly) on the same initial weights and feeds them the same gradients every step; the engines are
stepped in turn, round after round, in the same processes (the order rotated each round), so that machine
noise hits them alike. Prints rank 0's median over the timed steps of ``engine.step()`` and of the base
optimizer's own ``step`` on the CPU partition (all its calls in one ``engine.step()``: DeepSpeed calls it once
per parameter group), with ratios to DeepSpeedCPUAdam and to torch's fused AdamW, and the build/load times
of DeepSpeed's cpu_adam op and of hf_adamp's kernels. Afterwards it checks that hf_adamp.AdamP/SGDP really
projected (a ZeRO partition is 1-D: an optimizer that cannot map it to rows acts as AdamW/SGD).

    python benchmarks/zero_offload_step.py --model gpt2-small --steps 10
    python benchmarks/zero_offload_step.py --model small --steps 2 --sets adam
    python benchmarks/zero_offload_step.py --only "hf_adamp.adamp,deepspeed" --sequential

The model is the parameter shapes of ``step_time.py`` (GPT-2 small: 148 tensors, 124M parameters) behind a
loss ``sum(p * g)`` with fixed per-rank tensors ``g``, so the gradients do not depend on the weights: every
engine gets exactly the same ones at every step. The ``g`` of the weight matrices of the blocks is made
orthogonal to the initial weight rows (the case of weights followed by a normalisation, the one AdamP's
projection is for), so AdamP/SGDP take the projection branch; the embeddings and 1-D tensors get plain
random gradients. Weight decay 0.01 on tensors with 2 or more dimensions, none on the others.

Memory: each engine takes about 24 bytes per parameter on each rank (3 GB at GPT-2 small: weights, fp32
partition and its gradient, moments, DeepSpeed's offload buffers). The Adam set and the SGD set run in
separate process pairs, and a set that does not fit the free memory is split into several pairs (``--engines``
per pair, by default as many as fit, at least 2), each holding the set's first optimizer (hf_adamp.AdamP or
hf_adamp.SGDP) next to the others: every ratio to it comes from steps interleaved in the same ranks.
``--sequential`` builds, times and frees one engine at a time instead (least memory, no interleaving).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import MODELS  # noqa: E402

WORLD = 2
# Small steps: the gradients are fixed, and every step moves the weights along -g, which tilts g away from
# orthogonal (Adam at lr 1e-5 lost the projection of GPT-2's c_attn rows after ~5 steps); the times do not
# depend on the learning rate.
LR = {"adam": 1e-7, "sgd": 1e-3}
WD = 0.01
# name -> (set, kind, eager HF_ADAMP_DISABLE_FUSED path); kind picks the constructor in make_optimizer
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "hf_adamp.AdamP": ("adam", "hf_adamp.AdamP", False),
    "DeepSpeedCPUAdam": ("adam", "DeepSpeedCPUAdam", False),
    "torch.AdamW(fused)": ("adam", "torch.AdamW(fused)", False),
    "hf_adamp.AdamP(eager)": ("adam", "hf_adamp.AdamP", True),
    "hf_adamp.SGDP": ("sgd", "hf_adamp.SGDP", False),
    "torch.SGD(fused)": ("sgd", "torch.SGD(fused)", False),
    "hf_adamp.SGDP(eager)": ("sgd", "hf_adamp.SGDP", True),
}  # the first of each set is the anchor: in every process pair of that set
SETS = ("adam", "sgd")
# pairs that must end with (nearly) the same weights: same gradients, same update rule
SAME_RULE = [("hf_adamp.AdamP", "hf_adamp.AdamP(eager)"), ("DeepSpeedCPUAdam", "torch.AdamW(fused)")]
SAME_RULE += [("hf_adamp.SGDP", "hf_adamp.SGDP(eager)")]


# ----------------------------------------------------------------------------------------------- worker
class Stack(torch.nn.Module):
    """Parameters of the given shapes; forward() returns sum(p * g) over all of them."""

    def __init__(self, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in weights])
        self.grads = grads  # plain tensors, shared by every engine of the rank

    def forward(self) -> torch.Tensor:
        return sum((p * g).sum() for p, g in zip(self.params, self.grads, strict=True))


def make_tensors(shapes: list[tuple], rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    gen = torch.Generator().manual_seed(1000 + rank)
    grads = []
    for i, (w, s) in enumerate(zip(weights, shapes, strict=True)):
        g = torch.randn(s, generator=gen) * 1e-3
        if len(s) >= 2 and i >= 2:  # block weights (not wte/wpe): orthogonal to each initial row
            rows, w2 = g.view(s[0], -1), w.view(s[0], -1)
            rows -= (rows * w2).sum(1, keepdim=True) / (w2 * w2).sum(1, keepdim=True) * w2
        grads.append(g)
    return weights, grads


def make_optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    import hf_adamp

    if kind == "hf_adamp.AdamP":
        return hf_adamp.AdamP(groups, lr=LR["adam"])
    if kind == "DeepSpeedCPUAdam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=LR["adam"], adamw_mode=True)
    if kind == "torch.AdamW(fused)":
        return torch.optim.AdamW(groups, lr=LR["adam"], fused=True)
    if kind == "hf_adamp.SGDP":
        return hf_adamp.SGDP(groups, lr=LR["sgd"], momentum=0.9)
    if kind == "torch.SGD(fused)":
        return torch.optim.SGD(groups, lr=LR["sgd"], momentum=0.9, fused=True)
    raise ValueError(kind)


def ds_config(clip: float) -> dict:
    bucket = 50_000_000  # elements; DeepSpeed's default (5e8) would add 2 GB of fp32 buckets per rank
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,  # DeepSpeed's default is 1.0
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": False},
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Run:
    """One engine and its timings."""

    def __init__(self, name: str, weights, grads, clip: float) -> None:
        import deepspeed

        import hf_adamp.sharding

        self.name = name
        _, kind, self.eager = VARIANTS[name]
        model = Stack(weights, grads)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]
        self.client = make_optimizer(kind, groups)
        self.engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=self.client, config=ds_config(clip))
        if not getattr(zero_opt, "cpu_offload", False):
            raise RuntimeError(f"{name}: DeepSpeed did not offload the optimizer")
        if zero_opt.optimizer is not self.client:
            raise RuntimeError(f"{name}: DeepSpeed replaced the client optimizer by {type(zero_opt.optimizer)}")
        self.projected = kind.startswith("hf_adamp")
        self.layouts = hf_adamp.sharding.attach(self.engine) if self.projected else []
        self.engine_ms: list[float] = []
        self.base_ms: list[float] = []
        self.calls: list[int] = []
        self._base = 0.0
        self._calls = 0
        inner = self.client.step  # DeepSpeed calls client.step() once per group: time each call

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._base += time.perf_counter() - t0
                self._calls += 1

        self.client.step = timed

    def step(self, record: bool) -> None:
        import torch.distributed as dist

        self.engine.backward(self.engine())
        gc.collect()
        if self.eager:
            os.environ["HF_ADAMP_DISABLE_FUSED"] = "1"
        dist.barrier()
        self._base, self._calls = 0.0, 0
        t0 = time.perf_counter()
        self.engine.step()
        dt = time.perf_counter() - t0
        if self.eager:
            os.environ.pop("HF_ADAMP_DISABLE_FUSED", None)
        if record:
            self.engine_ms.append(dt * 1e3)
            self.base_ms.append(self._base * 1e3)
            self.calls.append(self._calls)

    def partitions(self) -> list[torch.Tensor]:
        return list(self.engine.optimizer.single_partition_of_fp32_groups)

    def decisions(self) -> dict[str, int]:
        counts = {"channel": 0, "layer": 0, "none": 0}
        for kind in self.client.projection_decisions().values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def close(self) -> None:
        self.engine.destroy()
        self.engine = self.client = None


def _rss_mb(field: str = "VmRSS:") -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def load_times(with_cpu_adam: bool) -> dict:
    """Build or load hf_adamp's kernels and (when it runs) DeepSpeed's cpu_adam op; how long each took, which
    ISA."""
    import hf_adamp.kernels

    out: dict = {}
    t0 = time.perf_counter()
    out["hf_adamp_available"] = hf_adamp.kernels.available()
    out["hf_adamp_wall_s"] = time.perf_counter() - t0
    out["hf_adamp_build_seconds"] = hf_adamp.kernels.build_seconds
    out["hf_adamp_flags"] = " ".join(hf_adamp.kernels._cpu_flags()) or "(x86-64 baseline)"
    if not with_cpu_adam:  # its first build takes minutes
        return out
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    t0 = time.perf_counter()
    builder.load(verbose=False)
    out["ds_cpu_adam_s"] = time.perf_counter() - t0
    out["ds_cpu_adam_flags"] = f"{builder.cpu_arch()} {builder.simd_width()}"
    return out


def worker(args: argparse.Namespace) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    import_s = time.perf_counter() - t0
    loads = load_times("DeepSpeedCPUAdam" in args.variants.split(","))
    dist.barrier()

    shapes = MODELS[args.model]()
    weights, grads = make_tensors(shapes, rank)
    names = args.variants.split(",")
    result: dict = dict(loads, import_s=import_s, names=names, sequential=args.sequential, runs={})
    rounds = args.warmup + args.steps
    finished: dict[str, Run] = {}

    def summary(run: Run) -> dict:
        out = dict(engine_ms=run.engine_ms, base_ms=run.base_ms, calls=run.calls, layouts=len(run.layouts))
        if run.projected:
            out["decisions"] = run.decisions()
        return out

    if args.sequential:
        for name in names:
            run = Run(name, weights, grads, args.clip)
            for r in range(rounds):
                run.step(record=r >= args.warmup)
            result["runs"][name] = summary(run)
            result.setdefault("rss_mb", {})[name] = _rss_mb()
            result.setdefault("peak_mb", {})[name] = _rss_mb("VmHWM:")
            run.close()
            del run
            gc.collect()
    else:
        t0 = time.perf_counter()
        runs = [Run(name, weights, grads, args.clip) for name in names]
        result["init_s"] = time.perf_counter() - t0
        result["rss_mb"] = _rss_mb()
        for r in range(rounds):
            k = r % len(runs)
            for run in runs[k:] + runs[:k]:  # rotate the order: no variant always runs first
                run.step(record=r >= args.warmup)
        for run in runs:
            result["runs"][run.name] = summary(run)
            finished[run.name] = run
        # same gradients and update rule -> the same weights (checked on this rank's partitions)
        diffs = {}
        for a, b in SAME_RULE:
            if a in finished and b in finished:
                pa, pb = finished[a].partitions(), finished[b].partitions()
                diffs[f"{a} vs {b}"] = max(float((x - y).detach().abs().max()) for x, y in zip(pa, pb, strict=True))
        result["max_abs_diff"] = diffs
    result["peak_rss_mb"] = _rss_mb("VmHWM:")
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(args.out).write_text(json.dumps(gathered))
    dist.barrier()


# --------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, names: list[str], workdir: Path, tag: str) -> list[dict]:
    out = workdir / f"{tag}.json"
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS=str(args.threads),
    )
    env.pop("HF_ADAMP_DISABLE_FUSED", None)  # the eager variants set it themselves, around their step
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out), "--variants", ",".join(names)]
    cmd += ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--clip", str(args.clip), "--threads", str(args.threads)] + (["--sequential"] if args.sequential else [])
    logs = [workdir / f"{tag}.rank{r}.log" for r in range(WORLD)]
    procs = []
    for r in range(WORLD):
        with open(logs[r], "w") as log:
            rank_env = dict(env, RANK=str(r), LOCAL_RANK=str(r))
            procs.append(subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + args.timeout
    # a rank that fails leaves the other waiting in a collective: stop it then, or at the deadline
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.5)
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes) or not out.exists():
        tails = "\n".join(f"--- rank {r} (exit {codes[r]}) ---\n{logs[r].read_text()[-4000:]}" for r in range(WORLD))
        raise SystemExit(f"zero_offload_step: the {tag} ranks failed (exit codes {codes}):\n{tails}")
    if args.show_warnings:
        seen: list[str] = []
        for line in logs[0].read_text().splitlines():
            if "warn" in line.lower() and line.split("]")[-1] not in seen:
                seen.append(line.split("]")[-1])
        for line in seen[:12]:
            print(f"  [rank 0 log, {tag}] {line.strip()[:200]}")
    return json.loads(out.read_text())


def engines_per_pair(n_params: int, most: int) -> int:
    """How many engines a process pair can hold in the memory available now (at least 2: an interleaved pair).

    Measured at GPT-2 small: about 24 bytes per parameter and engine on each rank (weights, fp32 partition and
    its gradient, moments, DeepSpeed's offload buffers), plus about 12 bytes per parameter (initial weights and
    the fixed gradients) and 0.8 GB (torch, DeepSpeed) per rank.
    """
    try:
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return most
    per_rank = (0.85 * avail) / WORLD - (12 * n_params + 0.8e9)
    return max(2, min(most, int(per_rank // (26 * n_params))))


def pairs_of(names: list[str], per: int) -> list[list[str]]:
    """All names in one process pair if they fit; else chunks that each start with the first name (the anchor),
    so that its ratio to every other optimizer comes from steps interleaved in the same ranks."""
    if len(names) <= per:
        return [names]
    anchor, others = names[0], names[1:]
    return [[anchor, *others[i : i + per - 1]] for i in range(0, len(others), per - 1)]


def _medians(run: dict) -> tuple[float, float]:
    return statistics.median(run["engine_ms"]), statistics.median(run["base_ms"])


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> bool:
    ok = True
    first = next(iter(results.values()))[0]
    hf_s = first["hf_adamp_build_seconds"]
    hf_load = f"{hf_s:.2f} s" if hf_s is not None else f"unavailable ({first['hf_adamp_wall_s']:.2f} s)"
    ds = (
        f"DeepSpeed cpu_adam op {first['ds_cpu_adam_s']:.2f} s [{first['ds_cpu_adam_flags']}]; "
        if "ds_cpu_adam_s" in first
        else ""
    )
    print(
        f"build/load (rank 0, first process pair): hf_adamp kernels {hf_load} [{first['hf_adamp_flags']}]; "
        f"{ds}import deepspeed + init_distributed {first['import_s']:.2f} s"
    )
    ratios: dict[str, list[tuple[str, str, float, float]]] = {}
    for tag, ranks in results.items():
        r0, kind = ranks[0], tag.split("-")[0]
        how = "one engine at a time (sequential)" if r0["sequential"] else "interleaved, order rotated each round"
        print(f"\n[{tag}] {len(r0['names'])} engines per rank, {how}; medians over {args.steps} steps")
        if "init_s" in r0:
            print(
                f"  engines built in {r0['init_s']:.1f} s; rank 0 memory: {r0['rss_mb']:.0f} MB after building, ",
                end="",
            )
        print(f"peak {r0['peak_rss_mb']:.0f} MB")
        med = {name: _medians(run) for name, run in r0["runs"].items()}
        head = f"  {'optimizer':22s} {'engine.step ms':>14s} {'base step ms':>12s} {'calls':>5s}"
        print(head + f" {'rank 1 (eng, base)':>18s} {'/' + r0['names'][0] + ' (eng, base)':>32s}")
        anchor = r0["names"][0]
        for name, (eng, base) in med.items():
            e1, b1 = _medians(ranks[1]["runs"][name])
            calls = r0["runs"][name]["calls"][-1]
            line = f"  {name:22s} {eng:14.1f} {base:12.1f} {calls:5d} {e1:9.1f} {b1:8.1f}"
            print(line + f" {eng / med[anchor][0]:16.2f} {base / med[anchor][1]:15.2f}")
            if name != anchor:
                ratios.setdefault(kind, []).append((anchor, name, med[anchor][0] / eng, med[anchor][1] / base))
        for name, run in r0["runs"].items():
            if "decisions" in run:
                d = run["decisions"]
                good = bool(d.get("channel", 0) + d.get("layer", 0)) and run["layouts"] > 0
                verdict = "projected" if good else "NEVER PROJECTED: acting as AdamW/SGD"
                print(
                    f"  exactness: {name} on the ZeRO-2 partitions ({run['layouts']} layouts), last step: "
                    f"{d.get('channel', 0)} channel-wise, {d.get('layer', 0)} layer-wise, {d.get('none', 0)} "
                    f"not projected -> {verdict}"
                )
                ok &= good
        for pair, diff in r0.get("max_abs_diff", {}).items():
            print(f"  same gradients check, max |w_a - w_b| after all steps, {pair}: {diff:.2e}")
    for kind, rows in ratios.items():
        print(f"\nratios [{kind}], each from the process pair where both ran (rank 0 medians):")
        for anchor, name, eng, base in rows:
            print(f"  {anchor} / {name}: engine.step {eng:.2f}, base optimizer step {base:.2f}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2-small")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per engine (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (state allocation, first loads)")
    ap.add_argument("--sets", default="adam,sgd", help="adam, sgd or both: each set runs in its own 2 ranks")
    ap.add_argument("--only", default="", help="comma-separated substrings; keep optimizers whose name has one")
    ap.add_argument(
        "--engines", type=int, default=0, help="engines per process pair (0: as many as the free memory allows)"
    )
    ap.add_argument("--sequential", action="store_true", help="one engine at a time (less memory)")
    ap.add_argument("--clip", type=float, default=0.0, help="DeepSpeed gradient_clipping (0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per rank")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per process pair before it is killed")
    ap.add_argument("--show-warnings", action="store_true", help="print the warnings of rank 0's log")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--variants", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        code = 0
        try:
            worker(args)  # ends in a barrier: every rank is done
        except BaseException:
            traceback.print_exc()
            code = 1
        # DeepSpeed's CPU shared-memory comm op can abort in interpreter teardown ("terminate called without
        # an active exception") after all work is done: leave without that teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    if importlib.util.find_spec("deepspeed") is None:
        raise SystemExit("zero_offload_step: DeepSpeed is not installed (pip install deepspeed); nothing to time")
    keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
    wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    if unknown := set(wanted) - set(SETS):
        raise SystemExit(f"zero_offload_step: unknown --sets {sorted(unknown)}; choose from adam, sgd")
    per_set = {
        tag: [n for n, (s, _, _) in VARIANTS.items() if s == tag and (not keys or any(k in n.lower() for k in keys))]
        for tag in wanted
    }
    per_set = {tag: names for tag, names in per_set.items() if names}
    if not per_set:
        raise SystemExit("zero_offload_step: --only matched no optimizer")

    shapes = MODELS[args.model]()
    n = sum(torch.Size(s).numel() for s in shapes)
    most = max(len(names) for names in per_set.values())
    per = most if args.sequential else (args.engines or engines_per_pair(n, most))
    load0 = os.getloadavg()
    print(
        f"model {args.model}: {len(shapes)} tensors, {n / 1e6:.1f}M parameters, fp32; DeepSpeed ZeRO-2, "
        f"offload_optimizer cpu, {WORLD} ranks (gloo, DS_ACCELERATOR=cpu), {args.threads} thread(s) per rank, "
        f"gradient_clipping {args.clip}, up to {per} engines per process pair; torch {torch.__version__}, "
        f"{os.cpu_count()} cpus"
    )
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="zero_offload_step_") as tmp:
        for kind, names in per_set.items():
            chunks = pairs_of(names, max(2, per))
            for i, chunk in enumerate(chunks):
                tag = kind if len(chunks) == 1 else f"{kind}-{i + 1}"
                results[tag] = launch(args, chunk, Path(tmp), tag)
    ok = report(results, args)
    load1 = os.getloadavg()
    print(f"\nload average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if not ok:
        raise SystemExit("zero_offload_step: an hf_adamp optimizer did not project under ZeRO-2 offload")


if __name__ == "__main__":
    main()
