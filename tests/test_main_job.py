"""The README's main job (examples/compare_optimizers.py) runs end to end on its bundled corpus, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_main_job(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    # No hub and no ../shared: the job must live on the corpus it ships with.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = ROOT / "examples" / "compare_optimizers.py"
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_main_job_on_the_bundled_corpus_prints_the_table_and_writes_plots(tmp_path):
    out = tmp_path / "out"
    done = run_main_job("--max_lines", "160", "--steps", "4", "--output_dir", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| Adam")]
    assert [row.split("|")[1].strip() for row in table] == ["AdamW", "AdamP"], done.stdout[-2000:]
    rows = json.loads((out / "summary.json").read_text())
    for row in rows:
        assert row["eval_loss"] > 0 and row["norm_start"] > 0 and row["norm_end"] > 0
    # Same seed and data: both start from the same weight-normalised model.
    assert rows[0]["norm_start"] == rows[1]["norm_start"]
    assert "projected" in rows[1] and "projected" not in rows[0]  # only AdamP has projection telemetry
    for name in ("loss.png", "weight_norm.png", "effective_step_size.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    assert "plots: " in done.stdout


def test_missing_data_is_a_clear_error(tmp_path):
    done = run_main_job("--train_file", str(tmp_path / "missing.txt"), cwd=tmp_path, timeout=300)
    assert done.returncode != 0 and "missing.txt" in done.stderr
