"""The main job: a small weight-normalised GPT-2 trained with the stock Trainer, once with AdamW, once with AdamP.

    python examples/compare_optimizers.py                       # the bundled WikiText-2 excerpt, offline
    python examples/compare_optimizers.py --train_file train.txt --validation_file valid.txt
    python examples/compare_optimizers.py --dataset_name Salesforce/wikitext --dataset_config_name wikitext-2-raw-v1

Both runs go through examples/run_clm.py (Trainer, ``optim="adamw_torch"`` then ``optim="adamp"``) with the same
seed, data, model, learning-rate schedule (cosine to zero) and weight norm: only the optimizer differs. It ends
with a table and PNGs of the training and validation loss, the norm of the weight-normalised directions and the
effective step size ``lr / |w|^2``.

What to look for: the weight-normalised layers compute the same function whatever the norm of their direction
``v``, so the gradient is orthogonal to ``v`` and every AdamW step makes ``|v|`` grow, which shrinks the step
that actually changes the direction (``lr / |v|^2``). AdamP removes that radial part of the update, so ``|v|``
stays put and the effective step size follows the schedule. Whether that gives a lower loss depends on the
learning rate: the norm growth acts like an extra decay of AdamW's rate (see results/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run_clm & co. next to this file

EXCERPT = HERE / "data" / "wikitext-2-excerpt"
OPTIMIZERS = {"AdamW": "adamw_torch", "AdamP": "adamp"}
MODEL = "n_layer=4,n_embd=128,n_head=4,n_inner=512"
NORM = "scale_invariant/weight_norm"


def clm_arguments(args: argparse.Namespace, optim: str, output_dir: Path, tokenizer: Path | None) -> list[str]:
    if args.dataset_name:
        data = ["--dataset_name", args.dataset_name, "--dataset_config_name", args.dataset_config_name]
    else:
        data = ["--train_file", args.train_file, "--validation_file", args.validation_file]
    if args.max_lines:
        data += ["--max_train_samples", str(args.max_lines), "--max_eval_samples", str(max(20, args.max_lines // 8))]
    argv = [
        *data,
        "--output_dir",
        str(output_dir),
        "--optim",
        optim,
        "--learning_rate",
        str(args.lr),
        "--weight_decay",
        str(args.weight_decay),
        "--lr_scheduler_type",
        "cosine",
        "--warmup_steps",
        "0",
        "--max_steps",
        str(args.steps),
        "--max_grad_norm",
        "0.25",
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "32",
        "--block_size",
        str(args.block_size),
        "--config_overrides",
        MODEL,
        "--tokenizer_vocab_size",
        "4000",
        "--logging_steps",
        str(max(1, args.steps // 30)),
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(max(1, args.steps // 4)),
        "--save_strategy",
        "no",
        "--do_train",
        "--do_eval",
        "--seed",
        str(args.seed),
        "--report_to",
        "none",
        "--log_level",
        "warning",
        "--weight_norm",
        str(args.weight_norm).lower(),
    ]
    if tokenizer is not None:  # the second run reuses the first one's tokenizer: same ids, same initial weights
        argv += ["--tokenizer_name", str(tokenizer)]
    return argv


def history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def summarise(name: str, output_dir: Path, metrics: dict, wall: float, peak_lr: float) -> dict:
    norms = [(h["step"], h[NORM]) for h in history(output_dir) if NORM in h]
    decisions = [h for h in history(output_dir) if "projection/none" in h]
    row = {
        "optimizer": name,
        "eval_loss": metrics["eval_loss"],
        "perplexity": metrics["perplexity"],
        "wall_s": wall,
        "norm_start": norms[0][1] if norms else math.nan,
        "norm_end": norms[-1][1] if norms else math.nan,
    }
    # lr / |w|^2 at the peak rate: the norm's share of the effective step size, whatever the schedule did
    count = next((h["scale_invariant/count"] for h in history(output_dir) if "scale_invariant/count" in h), 1)
    row["ess_start"] = peak_lr * count / row["norm_start"] ** 2 if norms else math.nan
    row["ess_end"] = peak_lr * count / row["norm_end"] ** 2 if norms else math.nan
    if decisions:
        last = decisions[-1]
        row["projected"] = "/".join(f"{last[f'projection/{k}']:.0f}" for k in ("channel", "layer", "none"))
    return row


def print_table(rows: list[dict]) -> None:
    print()
    print(
        "| optimizer | validation loss | perplexity | norm of the WN directions | peak lr / mean |w|^2 "
        "| last step channel/layer/none | wall time |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['optimizer']} | {r['eval_loss']:.3f} | {r['perplexity']:.1f} | "
            f"{r['norm_start']:.2f} -> {r['norm_end']:.2f} | {r['ess_start']:.2e} -> {r['ess_end']:.2e} | "
            f"{r.get('projected', '-')} | {r['wall_s']:.0f} s |"
        )
    print()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train_file", default=str(EXCERPT / "train.txt.gz"), help="plain or .gz text, a line a sample")
    ap.add_argument("--validation_file", default=str(EXCERPT / "valid.txt.gz"))
    ap.add_argument("--dataset_name", help="a hub dataset instead of the files (e.g. Salesforce/wikitext)")
    ap.add_argument("--dataset_config_name", default="wikitext-2-raw-v1")
    ap.add_argument("--max_lines", type=int, help="use only the first N training lines (N/8 validation lines)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, the same for both")
    ap.add_argument("--weight_decay", type=float, default=0.01)
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--weight_norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="weight-normalise the attention and MLP projections (default: on)",
    )
    ap.add_argument("--output_dir", type=Path, default=Path("runs/compare_optimizers"))
    args = ap.parse_args(argv)
    if not args.dataset_name:
        for path in (args.train_file, args.validation_file):
            if not Path(path).is_file():
                raise SystemExit(f"error: data file not found: {path}")

    from run_clm import main as run_clm

    from hf_adamp.plot import plot_runs

    rows, tokenizer = [], None
    for name, optim in OPTIMIZERS.items():
        out = args.output_dir / name.lower()
        print(f"\n=== {name} (optim={optim!r}), {args.steps} steps ===", flush=True)
        start = time.perf_counter()
        metrics = run_clm(clm_arguments(args, optim, out, tokenizer))
        rows.append(summarise(name, out, metrics, time.perf_counter() - start, args.lr))
        tokenizer = tokenizer or out
    print_table(rows)
    plots = plot_runs([args.output_dir / n.lower() for n in OPTIMIZERS], args.output_dir / "plots", list(OPTIMIZERS))
    print("plots: " + ", ".join(str(p) for p in plots))
    (args.output_dir / "summary.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
