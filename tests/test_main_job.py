"""The README's main job (examples/compare_optimizers.py) runs end to end on a few lines of WikiText-2."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "train.txt"


@pytest.mark.skipif(not WIKITEXT.is_file(), reason=f"{WIKITEXT} not found (the shared data folder beside the repo)")
def test_compare_optimizers_runs_and_reports_both(tmp_path):
    cmd = [
        sys.executable,
        "examples/compare_optimizers.py",
        "--train_file",
        str(WIKITEXT),
        "--max_lines",
        "300",
        "--steps",
        "3",
        "--weight_norm",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "final validation loss: AdamW" in done.stdout and "AdamP" in done.stdout
    assert done.stdout.count("norm of the weight-normalised directions") == 2


def test_missing_data_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "examples/compare_optimizers.py", "--train_file", str(tmp_path / "missing.txt")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "missing.txt" in done.stderr
