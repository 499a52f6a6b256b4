"""The seeded small-scale study behind results/README.md: runs, resumes, and reports.

    python results/study.py                      # every run not done yet, then the report
    python results/study.py --only lm/sweep      # a subset (substring of the run names)
    python results/study.py --list               # the plan, with what is done
    python results/study.py --report             # tables and PNGs from the JSONs present
    python results/study.py --data my_corpus/    # the LM study on another corpus (train.txt, valid.txt)

Each run is one call of examples/run_clm.py or examples/run_translation.py with a CPU config from
configs/experiments/cpu/ and the study's overrides below. It writes results/runs/<task>/<config>/lr<lr>_s<seed>.json
(config, seed, commit, the exact command, final metrics, curves, wall time) when it ends; runs whose JSON
exists are skipped, so an interrupted study continues where it stopped. The language-model runs start with a
learning-rate sweep of AdamW + WN and AdamP + WN (seed 0); their seeded runs then use each one's best rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = DEFAULT_RUNS = ROOT / "results" / "runs"
SHARED = ROOT.parent / "shared" / "data"  # the development machines' offline copies; pass --data elsewhere

SEEDS = (0, 1, 2)
LM_SWEEP = (1e-3, 2e-3, 4e-3)  # AdamW + WN and AdamP + WN, seed 0
LM_BASE_LR = 2e-3  # AdamW and AdamP without weight norm: the middle of the sweep
MT_LR = 1e-3

ALL = 10**9  # "no limit" for the configs' sample limits

# Shared by every run of a task, on top of the CPU configs (which differ only in optimizer, WN and warmup).
LM_OVERRIDES = {
    "config_overrides": "n_layer=4,n_embd=128,n_head=4,n_inner=512",
    "tokenizer_vocab_size": 4000,
    "block_size": 128,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "max_steps": 1000,
    "lr_scheduler_type": "cosine",  # to zero
    "warmup_steps": 0,
    "eval_steps": 200,
    "logging_steps": 20,
    "max_train_samples": ALL,  # the whole files
    "max_eval_samples": ALL,
}
MT_OVERRIDES = {
    "config_overrides": "encoder_layers=3,decoder_layers=3,d_model=128,encoder_ffn_dim=512,decoder_ffn_dim=512,"
    "encoder_attention_heads=4,decoder_attention_heads=4",
    "tokenizer_vocab_size": 4000,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "max_steps": 1500,
    "lr_scheduler_type": "linear",  # to zero
    "learning_rate": MT_LR,
    "eval_steps": 500,
    "logging_steps": 20,
    "max_train_samples": ALL,
    "max_eval_samples": ALL,
}
MT_WARMUP_STEPS = 150  # 10 % of the run, for the configs that warm up

LM_CONFIGS = {
    "adamw": "AdamW",
    "adamp": "AdamP",
    "adamw_wn": "AdamW + WN",
    "adamp_wn": "AdamP + WN",
}
# the papers' figures for the same configs (AdamP paper: WikiText-103 word perplexity, Transformer-XL base;
# RAdam paper: IWSLT'14 De-En, where it reports the outcome rather than a BLEU for every config)
LM_PAPER = {"adamw": "23.38", "adamp": "23.26", "adamw_wn": "23.96", "adamp_wn": "22.77"}
MT_PAPER = {
    "adam_nowarmup": "converges badly",
    "adam_warmup": "≈ RAdam",
    "radam_nowarmup": "≈ Adam with warmup",
    "adamp": "not in the papers",
}
MT_CONFIGS = {
    "adam_nowarmup": "Adam, no warmup",
    "adam_warmup": "Adam, warmup",
    "radam_nowarmup": "RAdam, no warmup",
    "adamp": "AdamP, warmup",
}


@dataclass
class Run:
    task: str  # "lm" or "mt"
    config: str  # a key of LM_CONFIGS / MT_CONFIGS
    lr: float
    seed: int
    sweep: bool = False
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.task}/{'sweep/' if self.sweep else ''}{self.config}/lr{self.lr:g}_s{self.seed}"

    @property
    def path(self) -> Path:
        return RUNS / self.task / self.config / f"lr{self.lr:g}_s{self.seed}.json"


# ----- the plan -----
THREADS = 1  # one thread a run: steady speed on a shared machine (--threads)
EXTRA: dict[str, str] = {}  # --set key=value: pilots and quick checks, on top of everything


def lm_runs(data: Path) -> list[Run]:
    files = {"train_file": relative(data / "train.txt"), "validation_file": relative(data / "valid.txt")}
    sweep = [Run("lm", c, lr, 0, sweep=True, overrides=files) for c in ("adamw_wn", "adamp_wn") for lr in LM_SWEEP]
    seeded = []
    for config in LM_CONFIGS:
        lr = best_lr(config) if config.endswith("_wn") else LM_BASE_LR
        seeded += [Run("lm", config, lr, s, overrides=files) for s in SEEDS if lr is not None]
    return sweep + seeded


def mt_runs(data: Path) -> list[Run]:
    files = {
        f"{split}_{side}_file": relative(data / f"{prefix}.{lang}.gz")
        for split, prefix in (("train", "train"), ("validation", "val"))
        for side, lang in (("source", "de"), ("target", "en"))
    }
    out = []
    for seed in SEEDS:
        for config in MT_CONFIGS:
            warmup = 0 if config.endswith("nowarmup") else MT_WARMUP_STEPS
            out.append(Run("mt", config, MT_LR, seed, overrides={**files, "warmup_steps": warmup}))
    return out


def relative(path: Path) -> str:
    """Paths in the recorded commands as the runs see them (from the repository root), not this machine's."""
    return os.path.relpath(path.resolve(), ROOT)


def best_lr(config: str) -> float | None:
    """The sweep's rate with the lowest final validation loss, once all its runs are done."""
    losses = {}
    for lr in LM_SWEEP:
        result = load(Run("lm", config, lr, 0).path)
        if result is None:
            return None
        losses[lr] = result["metrics"]["eval_loss"]
    return min(losses, key=losses.get)


def plan(lm_data: Path, mt_data: Path) -> list[Run]:
    """Sweep first (the seeded LM runs depend on it), then seed by seed, so a partial study has whole seeds."""
    runs = lm_runs(lm_data)
    sweep = [r for r in runs if r.sweep]
    rest = sorted([r for r in runs if not r.sweep] + mt_runs(mt_data), key=lambda r: (r.seed, r.task))
    unique: dict[Path, Run] = {}
    for run in sweep + rest:
        unique.setdefault(run.path, run)  # seed 0 at the best rate is a sweep run
    return list(unique.values())


# ----- one run -----
def command(run: Run, output_dir: Path) -> list[str]:
    script = "examples/run_clm.py" if run.task == "lm" else "examples/run_translation.py"
    prefix = "clm" if run.task == "lm" else "translation"
    config = f"configs/experiments/cpu/{prefix}_{run.config}.yaml"
    values = dict(LM_OVERRIDES if run.task == "lm" else MT_OVERRIDES)
    values.update(run.overrides)
    values.update(EXTRA)
    values.update(
        learning_rate=run.lr,
        seed=run.seed,
        output_dir=str(output_dir),
        save_strategy="no",
        eval_strategy="steps",
        disable_tqdm=True,
        report_to="none",
    )
    argv = [sys.executable, script, config]
    for key, value in values.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def execute(run: Run, keep: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="hf_adamp_study_") as scratch:
        output_dir = (keep / run.name) if keep else Path(scratch) / "out"
        argv = command(run, output_dir)
        log_path = run.path.with_suffix(".log")
        run.path.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(log_path, "w") as log:
            env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
            proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.time() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{run.name} failed (exit {proc.returncode}); see {log_path}")
        state = json.loads((output_dir / "trainer_state.json").read_text())
        metrics = json.loads((output_dir / "eval_results.json").read_text())
    log_path.unlink()  # the JSON keeps what matters; a failed run keeps its log
    cut = argv.index("--output_dir")
    shown = [shlex.quote(a) for a in argv[1:cut] + argv[cut + 2 :]]  # the output folder was a scratch one
    return {
        "name": run.name,
        "task": run.task,
        "config": run.config,
        "label": (LM_CONFIGS if run.task == "lm" else MT_CONFIGS)[run.config],
        "lr": run.lr,
        "seed": run.seed,
        "sweep": run.sweep,
        "command": f"OMP_NUM_THREADS={THREADS} python " + " ".join(shown),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch_version()}",
        "threads": THREADS,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(wall, 1),
        "metrics": metrics,
        "curves": curves(state["log_history"]),
    }


CURVE_KEYS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "eval_loss",
    "eval_bleu",
    "scale_invariant/weight_norm",
    "scale_invariant/effective_step_size",
    "projection/channel",
    "projection/layer",
    "projection/none",
)


def curves(history: list[dict]) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {}
    for entry in history:
        for key in CURVE_KEYS:
            if key in entry and "step" in entry:
                out.setdefault(key, []).append([entry["step"], entry[key]])
    return out


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def torch_version() -> str:
    import torch

    return torch.__version__


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ----- the report -----
def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def seeded_results(task: str, config: str) -> list[dict]:
    """The seeded runs of a config (at the rate the plan gives it), seed order."""
    lr = (best_lr(config) if config.endswith("_wn") else LM_BASE_LR) if task == "lm" else MT_LR
    if lr is None:
        return []
    found = [load(Run(task, config, lr, s).path) for s in SEEDS]
    return [r for r in found if r is not None]


def report_tables() -> str:
    lines = [
        "| LM (WikiText-2) | lr | seeds | validation perplexity (per token) | validation loss | "
        "WN norm at the end | minutes per run | paper (WikiText-103 perplexity) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config, label in LM_CONFIGS.items():
        rs = seeded_results("lm", config)
        norms = [
            r["curves"]["scale_invariant/weight_norm"][-1][1]
            for r in rs
            if "scale_invariant/weight_norm" in r["curves"]
        ]
        lines.append(
            f"| {label} | {rs[0]['lr']:g} | {len(rs)} | {mean_std([r['metrics']['perplexity'] for r in rs])} | "
            f"{mean_std([r['metrics']['eval_loss'] for r in rs])} | {mean_std(norms) if norms else '–'} | "
            f"{mean_std([r['wall_time_s'] / 60 for r in rs])} | {LM_PAPER[config]} |"
            if rs
            else f"| {label} | | 0 | | | | | {LM_PAPER[config]} |"
        )
    lines += [
        "",
        "| MT (Multi30k De→En) | warmup steps | seeds | validation BLEU | validation loss | minutes per run "
        "| paper (IWSLT'14 De-En) |",
        "|---|---|---|---|---|---|---|",
    ]
    for config, label in MT_CONFIGS.items():
        rs = seeded_results("mt", config)
        warmup = 0 if config.endswith("nowarmup") else MT_WARMUP_STEPS
        lines.append(
            f"| {label} | {warmup} | {len(rs)} | {mean_std([r['metrics']['eval_bleu'] for r in rs])} | "
            f"{mean_std([r['metrics']['eval_loss'] for r in rs])} | {mean_std([r['wall_time_s'] / 60 for r in rs])} | "
            f"{MT_PAPER[config]} |"
            if rs
            else f"| {label} | {warmup} | 0 | | | | {MT_PAPER[config]} |"
        )
    lines += [
        "",
        "| LM sweep (seed 0) | " + " | ".join(f"lr {lr:g}" for lr in LM_SWEEP) + " |",
        "|---" * (len(LM_SWEEP) + 1) + "|",
    ]
    for config in ("adamw_wn", "adamp_wn"):
        cells = []
        for lr in LM_SWEEP:
            r = load(Run("lm", config, lr, 0).path)
            cells.append(f"{r['metrics']['perplexity']:.2f}" if r else "–")
        lines.append(f"| {LM_CONFIGS[config]} (validation perplexity) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_commands() -> str:
    """One command per table row: the driver call that (re)produces it, and the script call of seed 0."""
    lines = []
    for task, configs in (("lm", LM_CONFIGS), ("mt", MT_CONFIGS)):
        for config in configs:
            rs = seeded_results(task, config)
            if rs:
                lines.append(
                    f"- {configs[config]} ({task}): `python results/study.py --only {task}/{config}/` — "
                    f"seed 0 ran `{rs[0]['command']}` at commit {rs[0]['commit'][:7]}"
                )
    return "\n".join(lines)


PLOTS = {
    "lm": (
        ("eval_loss", "validation loss", False),
        ("loss", "training loss", False),
        ("scale_invariant/weight_norm", "norm of the weight-normalised directions", False),
        ("scale_invariant/effective_step_size", "effective step size lr / |w|^2", True),
    ),
    "mt": (
        ("loss", "training loss", False),
        ("eval_loss", "validation loss", False),
        ("eval_bleu", "validation BLEU", False),
    ),
}


def plot_report(out: Path) -> list[Path]:
    """Per task and curve: the mean over seeds, with a band from the lowest to the highest seed; and the LM sweep's
    runs, one line per rate."""
    written = []
    for task, panels in PLOTS.items():
        configs = LM_CONFIGS if task == "lm" else MT_CONFIGS
        groups = {configs[c]: seeded_results(task, c) for c in configs}
        name = "WikiText-2 LM" if task == "lm" else "Multi30k De-En"
        for key, title, log_y in panels:
            path = out / f"{task}_{key.replace('/', '_').replace('scale_invariant_', '')}.png"
            written += draw(groups, key, f"{name}: {title}", log_y, path)
    sweep = {
        f"{LM_CONFIGS[c]}, lr {lr:g}": [r]
        for c in ("adamw_wn", "adamp_wn")
        for lr in LM_SWEEP
        if (r := load(Run("lm", c, lr, 0).path)) is not None
    }
    for key, title, log_y in PLOTS["lm"]:
        path = out / f"lm_sweep_{key.replace('/', '_').replace('scale_invariant_', '')}.png"
        written += draw(sweep, key, f"WikiText-2 LM, rate sweep (seed 0): {title}", log_y, path)
    return written


def draw(groups: dict[str, list[dict]], key: str, title: str, log_y: bool, path: Path) -> list[Path]:
    """One PNG of curve ``key``: a line per group (mean over its runs, a min-max band when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for label, rs in groups.items():
        series = [r["curves"][key] for r in rs if key in r["curves"]]
        if not series:
            continue
        n = min(len(s) for s in series)
        steps = np.array([p[0] for p in series[0][:n]])
        values = np.array([[p[1] for p in s[:n]] for s in series])
        (line,) = ax.plot(steps, values.mean(0), label=f"{label} ({len(series)} seed{'s' if len(series) > 1 else ''})")
        if len(series) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
        drawn = True
    if drawn:
        ax.set(title=title, xlabel="step")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path] if drawn else []


def write_report() -> None:
    """Refresh the generated part of the report (between its markers) and the PNGs: results/README.md and
    results/ for this study's runs, README.md and PNGs inside --runs-dir for any other."""
    out = ROOT / "results" if RUNS == DEFAULT_RUNS else RUNS
    readme = out / "README.md"
    text = readme.read_text() if readme.is_file() else f"# Study report: {RUNS}\n"
    begin, end = "<!-- study:begin -->", "<!-- study:end -->"
    generated = f"{begin}\n{report_tables()}\n\nCommands:\n{report_commands()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + generated + text[text.index(end) + len(end) :]
    else:
        text += "\n" + generated + "\n"
    readme.write_text(text)
    print(f"wrote {readme}")
    for path in plot_report(out):
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    global RUNS, THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=[], help="run only names containing one of these (see --list)")
    ap.add_argument("--data", type=Path, default=SHARED / "wikitext-2", help="LM corpus: train.txt and valid.txt")
    ap.add_argument("--mt-data", type=Path, default=SHARED / "multi30k", help="{train,val}.{de,en}.gz")
    ap.add_argument("--list", action="store_true", help="print the plan and what is done, run nothing")
    ap.add_argument("--report", action="store_true", help="only refresh results/README.md tables and the PNGs")
    ap.add_argument("--keep", type=Path, help="keep each run's Trainer output under this directory")
    ap.add_argument("--runs-dir", type=Path, default=RUNS, help="where the run JSONs go (another corpus: elsewhere)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each with --threads threads)")
    ap.add_argument("--threads", type=int, default=THREADS, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra script arguments (pilots)")
    args = ap.parse_args(argv)
    RUNS, THREADS = args.runs_dir.resolve(), args.threads
    EXTRA.update(item.split("=", 1) for item in args.set)
    if args.report:
        write_report()
        return
    for path, what in ((args.data / "train.txt", "--data"), (args.mt_data / "train.de.gz", "--mt-data")):
        if not path.is_file() and not args.list:
            raise SystemExit(f"{path} not found: point {what} at the corpus")
    if args.list:
        for run in selected(args):
            print(f"{'done' if run.path.is_file() else 'todo'}  {run.name}")
        return
    failed = run_all(args)
    write_report()
    if failed:
        raise SystemExit(f"{failed} run(s) failed; their logs are next to where their JSONs would be")


def selected(args: argparse.Namespace) -> list[Run]:
    def chosen(run: Run) -> bool:  # a seeded config's name also selects its seed-0 sweep run
        return not args.only or any(o in run.name or o in run.name.replace("sweep/", "") for o in args.only)

    return [r for r in plan(args.data, args.mt_data) if chosen(r)]


def run_all(args: argparse.Namespace) -> int:
    """Run what is pending, ``--jobs`` at a time; the plan is re-read after each run (it grows once the sweep
    is done). Returns the number of failed runs (the others go on)."""
    running: dict[Future, Run] = {}
    failed: set[Path] = set()
    with ThreadPoolExecutor(args.jobs) as pool:
        while True:
            busy = {r.path for r in running.values()} | failed
            pending = [r for r in selected(args) if not r.path.is_file() and r.path not in busy]
            for run in pending[: args.jobs - len(running)]:
                print(f"[{time.strftime('%H:%M:%S')}] start {run.name} ({len(pending)} waiting)", flush=True)
                running[pool.submit(execute, run, args.keep)] = run
            if not running:
                return len(failed)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                try:
                    result = future.result()
                except RuntimeError as err:
                    print(f"    {err}", flush=True)
                    failed.add(run.path)
                    continue
                tmp = run.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result, indent=1))
                os.replace(tmp, run.path)  # a JSON is only ever complete
                value = result["metrics"].get("perplexity", result["metrics"].get("eval_bleu", math.nan))
                print(f"    {run.name} done in {result['wall_time_s'] / 60:.1f} min: {value:.3f}", flush=True)


if __name__ == "__main__":
    main()
