"""Plot runs side by side from their ``trainer_state.json``: loss, perplexity, weight norm, step size.

    python -m hf_adamp.plot runs/adamw runs/adamp --labels AdamW AdamP --out plots/

Each run is a ``trainer_state.json`` file, a Trainer output directory holding one, or a directory of
``checkpoint-*`` folders (the latest is read). Needs matplotlib (``pip install hf-adamp[examples]``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

# (file name, title, y label, log-history keys to try in order, y on a log scale)
PANELS = [
    ("loss.png", "Training loss", "loss", ("loss",), False),
    ("perplexity.png", "Evaluation perplexity", "perplexity", ("eval_perplexity", "eval_loss"), True),
    (
        "weight_norm.png",
        "Norm of the scale-invariant weights",
        "|w|",
        ("scale_invariant/weight_norm", "projection/projected_weight_norm"),
        False,
    ),
    (
        "effective_step_size.png",
        "Effective step size lr / |w|^2",
        "lr / |w|^2",
        ("scale_invariant/effective_step_size", "projection/effective_step_size"),
        True,
    ),
]


def find_state(path: str | Path) -> Path:
    """The trainer_state.json a path names, or a clear error."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (expected a trainer_state.json or a run directory)")
    if (path / "trainer_state.json").is_file():
        return path / "trainer_state.json"
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        key=lambda p: int(re.sub(r"\D", "", p.name) or 0),
    )
    if checkpoints:
        return checkpoints[-1] / "trainer_state.json"
    raise FileNotFoundError(f"{path}: holds no trainer_state.json, directly or in a checkpoint-* folder")


def load_history(path: str | Path) -> list[dict]:
    state_file = find_state(path)
    try:
        history = json.loads(state_file.read_text())["log_history"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{state_file}: not a Trainer state file with a log_history ({err})") from err
    return history


def series(history: list[dict], keys: tuple[str, ...]) -> tuple[str, list[int], list[float]] | None:
    for key in keys:
        points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if points:
            steps, values = zip(*points)
            values = [math.exp(v) for v in values] if key == "eval_loss" else list(values)
            return key, list(steps), values
    return None


def plot_runs(runs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> list[Path]:
    """Write one PNG per panel that some run has data for; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = [load_history(r) for r in runs]
    labels = labels or [Path(r).name or str(r) for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, title, ylabel, keys, log_y in PANELS:
        curves = [(label, series(h, keys)) for label, h in zip(labels, histories)]
        curves = [(label, s) for label, s in curves if s is not None]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, (_key, steps, values) in curves:
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / file_name, dpi=100)
        plt.close(fig)
        written.append(out_dir / file_name)
    if not written:
        raise ValueError("none of the runs has logged values to plot (loss, perplexity, weight norms)")
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m hf_adamp.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", help="trainer_state.json files or run directories")
    ap.add_argument("--labels", nargs="+", help="one legend label per run (default: directory names)")
    ap.add_argument("--out", default="plots", help="output directory for the PNGs")
    args = ap.parse_args(argv)
    try:
        for path in plot_runs(args.runs, args.out, args.labels):
            print(path)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
